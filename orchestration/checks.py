"""What is checked before any stage runs: every stage's settings, local teacher and data, tokenizers.

Before any stage runs (and on --dry-run): every stage's settings pass the checks of its command's own
settings dataclass (identity.validate: `loss: kl` is refused before the teacher cache is built, naming
train.loss and the valid choices); local teacher folders and data files exist; students given as model
folders or hub ids already in the local Hugging Face cache share the teacher's tokenizer (layer-dropped
and config students use the teacher's by construction). Reads tokenizers through the trainer; runs no
model.
"""

from __future__ import annotations

import json
import os

from orchestration.caches import read_manifest, recorded_cache
from orchestration.identity import typed_settings, validate
from orchestration.plan import TEACHER, Plan, PlanError
from orchestration.plan_folder import plan_folder_problem
from orchestration.stages import stages_of
from shared.format import CacheError


def check_plan(plan: Plan, *, strict: bool = True) -> list[str]:
    """What can be checked before a stage runs: local teacher and data exist, model students share the tokenizer.

    Raises PlanError for a stage setting its command would refuse and for a student whose tokenizer differs
    from the teacher's (found now, not after the teacher cache is built), and with strict=True for a
    missing local teacher folder or data file. Returns notes on what is missing or could not be checked
    (a --dry-run prints them).
    """
    problem = plan_folder_problem(plan.out, plan.source)  # an error with --dry-run too: the run would be refused
    if problem:
        raise PlanError(problem)
    for stage in stages_of(plan):
        validate(stage, typed_settings(stage))
    notes = []
    teacher = plan.teacher["model"]
    if os.path.isabs(teacher) and not os.path.isdir(teacher) and "make" not in plan.teacher:
        message = (f"teacher folder {teacher} does not exist; create it first (see the comment at the top of "
                   f"{plan.source or 'the plan'}) or pass --teacher")
        if strict:
            raise PlanError(message)
        notes.append(message)
    for where, spec in (("data", plan.data), ("eval", plan.eval)):
        dataset = spec.get("dataset")
        if dataset and os.path.isabs(dataset) and not os.path.exists(dataset):
            message = (f"{where}.dataset {dataset} does not exist; create it first (see the comment at the top of "
                       f"{plan.source or 'the plan'})")
            if strict:
                raise PlanError(message)
            notes.append(message)
    return notes + check_student_tokenizers(plan)


def _local_model_folder(model: str) -> str | None:
    """model as a local folder: itself, or its snapshot in the local Hugging Face cache; None if neither."""
    if os.path.isdir(model):
        return model
    if os.path.isabs(model) or model.count("/") > 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
    except (ValueError, OSError):  # an id the hub library refuses (HFValidationError) is simply not in the cache
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


def _teacher_tokenizer(plan: Plan) -> tuple[str, int, str] | None:
    """(vocab sha256, number of token ids, name) of the root teacher, from its cache or
    its local folder."""
    from trainer.student import cache_token_ids

    try:
        cache = recorded_cache(plan, TEACHER)
        if cache is None:
            raise FileNotFoundError("no teacher cache yet")
        m = read_manifest(cache)
        return m.tokenizer["vocab_sha256"], cache_token_ids(m.tokenizer), str(m.teacher.get("name", plan.teacher["model"]))
    except (CacheError, OSError, ValueError, KeyError):
        pass
    folder = _local_model_folder(plan.teacher["model"])
    if folder is None:
        return None
    from common.tokenizers import tokenizer_of, vocab_fingerprint

    try:
        tokenizer = tokenizer_of(folder)
    except (OSError, ValueError):
        return None
    # As kdcache build counts them: the tokenizer's ids (padded embedding rows beyond them are never cached).
    return vocab_fingerprint(tokenizer), len(tokenizer), plan.teacher["model"]


def _config_vocab_size(folder: str) -> int | None:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(vocab) if isinstance(vocab, int) else None


def check_student_tokenizers(plan: Plan) -> list[str]:
    """Raise PlanError if a student given by model folder / locally cached hub id has another tokenizer.

    Students built from the teacher (keep_layers) or from a config use the teacher's tokenizer, and a
    sequential path's later teachers are students, so comparing each model student with the root
    teacher covers every stage. Returns notes on students that could not be checked.
    """
    models = {name: spec["model"] for name, spec in plan.students.items() if "model" in spec}
    if not models:
        return []
    teacher = _teacher_tokenizer(plan)
    if teacher is None:
        return [(f"tokenizers not checked yet: teacher {plan.teacher['model']} is neither a local folder nor in the "
                 "local Hugging Face cache (kdtrain run checks them after the teacher cache is built)")]
    from common.tokenizers import tokenizer_of
    from trainer.student import check_tokenizer_matches

    notes = []
    for name, model in models.items():
        folder = _local_model_folder(model)
        if folder is None:
            notes.append(f"students.{name}: {model} is neither a local folder nor in the local Hugging Face cache; "
                         "its tokenizer is checked when it trains")
            continue
        try:
            tokenizer = tokenizer_of(folder)
        except (OSError, ValueError) as exc:
            raise PlanError(f"plan: students.{name}: {exc}") from exc
        try:
            check_tokenizer_matches(tokenizer, teacher[0], teacher[1], num_student_embeddings=_config_vocab_size(folder),
                                    student_name=name, teacher_name=teacher[2])
        except ValueError as exc:
            raise PlanError(f"plan: students.{name} ({model}): {exc}") from exc
    return notes
