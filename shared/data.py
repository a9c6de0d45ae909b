"""Data sets -> token sequences with loss masks: the input side of a cache.

Both the cacher (to build a cache) and the trainer (to train a cross-entropy baseline on the same
data without a cache) turn a data set into the same sequences, so this lives in `shared`. It takes
a tokenizer object as an argument (anything with the Hugging Face tokenizer call interface) and
imports nothing about models.

Data set specs (`--dataset`):
- `builtin:pydoc-topics` (the default): the reference-manual topics that ship inside Python's
  standard library (`pydoc_data.topics`, about 460 KB of English), one row per topic, sorted by
  topic name. Needs no download.
- a local `.jsonl`/`.json`/`.parquet`/`.csv`/`.txt` file, or a folder of them (read with `datasets`).
  A single file is one split named `train`: `--split` may slice it (`train[:1000]`, `train[-500:]`)
  and any other split name is refused, never silently ignored;
- a Hugging Face hub data set name, with `--split` and, for data sets that have several
  configurations (subsets), `--dataset-config` (e.g. `openai/gsm8k` needs `main` or `socratic`).
  A local folder takes both too (its README.md may define configurations).

Local files and folders are recorded by their real path (`DataInfo.name`), so `./data.jsonl` and
`/abs/data.jsonl` name one build.

Sequences:
- text rows (`--text-field`, default `text`): each row is tokenized and cut into consecutive,
  non-overlapping windows of `max_length` tokens; `loss_mask` is true on every row but the last of
  a window. A final window of a single token cannot be trained on; it is counted (`num_dropped`)
  and reported, never silently lost.
- prompt/response rows (`--prompt-field`, `--response-field`): the prompt formatted by a template
  (`--prompt-template`, PROMPT_TEMPLATES; default: `chat` when the tokenizer has a chat template,
  else `plain`), then the response and EOS; `loss_mask` is true exactly on the rows whose next token
  belongs to the response. Responses longer than fits are truncated (counted); rows whose prompt
  alone leaves no room for a response token are skipped (counted).

Prompt templates (the name is recorded as the manifest's `settings.template`):
- `chat`: the tokenizer's chat template, one user turn then the assistant's response;
- `plain`: PLAIN_TEMPLATE, tokenized as text;
- `minillm`: MiniLLM's instruction template (MINILLM_TEMPLATE, or MINILLM_TEMPLATE_WITH_INPUT when
  the row's `--input-field`, e.g. dolly's `context`, is non-empty), tokenized as text. `kdtrain eval`'s
  ROUGE-L prompts are made by the same function (prompt_only_ids), so a cache built with it trains on
  exactly the prompts the evaluation asks.
The plain and minillm prompts are `tokenizer(text)["input_ids"]` and the response follows as
`tokenizer(response, add_special_tokens=False)` plus EOS, so the prompt's ids never depend on the response.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

BUILTIN_PREFIX = "builtin:"
DEFAULT_DATASET = "builtin:pydoc-topics"
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
# MiniLLM's dolly template (LMOps minillm), the one its ROUGE-L protocol prompts with.
MINILLM_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
MINILLM_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_TEMPLATES = ("chat", "plain", "minillm")
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


class DataError(ValueError):
    """A data set problem the user can fix (unknown data set or field, empty data, bad template)."""


@dataclass
class Sequence:
    input_ids: np.ndarray  # (T,) int64
    loss_mask: np.ndarray  # (T,) bool; row t is trained when token t+1 is a target
    source_index: int
    window_index: int = 0
    prompt_length: int = 0
    text_sha256: str = ""
    reference: str | None = None  # the data set's response text (evaluation, generate mode)

    def meta(self) -> dict:
        return {
            "source_index": self.source_index,
            "window_index": self.window_index,
            "prompt_length": self.prompt_length,
            "text_sha256": self.text_sha256,
        }


@dataclass
class DataInfo:
    """Counts and settings that describe how the sequences were made (goes into the manifest)."""

    name: str
    split: str | None
    fields: dict
    template: str | None = None
    config: str | None = None  # --dataset-config; recorded only when given (it then counts in the cache_key)
    num_source_rows: int = 0
    num_windows: int = 0
    num_dropped: int = 0  # tokens that could not be trained on (1-token windows, skipped rows)
    num_truncated: int = 0  # response tokens cut by max_length
    num_skipped_rows: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "name": self.name, "split": self.split, **({"config": self.config} if self.config is not None else {}),
            "fields": self.fields, "template": self.template,
            "num_source_rows": self.num_source_rows, "num_windows": self.num_windows,
            "num_dropped": self.num_dropped, "num_truncated": self.num_truncated,
            "num_skipped_rows": self.num_skipped_rows,
        }


# ---------------------------------------------------------------------------------------------
# Rows


def builtin_rows(name: str) -> list[dict]:
    if name == "pydoc-topics":
        from pydoc_data.topics import topics

        return [{"text": topics[key], "topic": key} for key in sorted(topics)]
    raise DataError(f"unknown built-in data set {BUILTIN_PREFIX}{name}; built-ins: {BUILTIN_PREFIX}pydoc-topics")


def dataset_name(dataset: str) -> str:
    """The name a cache records: a local file's or folder's real path, else the spec as given."""
    if dataset.startswith(BUILTIN_PREFIX):
        return dataset
    path = os.path.expanduser(dataset)
    return os.path.realpath(path) if os.path.exists(path) else dataset


def load_rows(dataset: str, split: str | None = None, config: str | None = None):
    """An iterable of dict rows plus the list of column names.

    split: default 'train'. config: the data set's configuration (hub data sets and folders only).
    """
    if dataset.startswith(BUILTIN_PREFIX):
        if config is not None or split not in (None, "train"):
            raise DataError(f"--dataset {dataset} is a built-in data set with one split and no configurations; "
                            "drop --split and --dataset-config")
        rows = builtin_rows(dataset[len(BUILTIN_PREFIX):])
        return rows, list(rows[0].keys())
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    path = os.path.expanduser(dataset)
    local = os.path.isfile(path) or os.path.isdir(path)
    try:
        if os.path.isfile(path):
            suffix = os.path.splitext(path)[1].lower()
            if suffix not in LOCAL_SUFFIXES:
                raise DataError(f"--dataset {dataset}: unsupported file type {suffix!r}; use one of {sorted(LOCAL_SUFFIXES)}")
            if config is not None:
                raise DataError(f"--dataset-config {config}: --dataset {dataset} is a single file, which has no "
                                "configurations; drop --dataset-config, or pass a folder or hub data set that has them")
            if os.path.getsize(path) == 0:
                raise DataError(f"--dataset {dataset} is an empty file (0 bytes): there is nothing to build a cache from")
            kwargs = {"sample_by": "document"} if suffix == ".txt" else {}  # a .txt file is one document
            try:
                # A single file is the split 'train'; --split may slice it ('train[:1000]').
                ds = datasets.load_dataset(LOCAL_SUFFIXES[suffix], data_files=path, split=split or "train", **kwargs)
            except ValueError as exc:
                if split is not None and "split" in str(exc).lower() and "corresponds to no data" not in str(exc):
                    raise DataError(
                        f"--split {split}: --dataset {dataset} is a single file, which is one split named 'train' "
                        f"({' '.join(str(exc).split())}). Drop --split, slice the file with --split 'train[:1000]', or "
                        "pass a folder or hub data set that has the split") from exc
                raise
        elif os.path.isdir(path):
            ds = datasets.load_dataset(path, config, split=split or "train")
        elif dataset.startswith((".", "/", "~")) or os.path.splitext(path)[1].lower() in LOCAL_SUFFIXES:
            raise DataError(f"--dataset {dataset}: no such file or folder")
        else:
            ds = datasets.load_dataset(dataset, config, split=split or "train")
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"--dataset {dataset}: not found ({exc}). Pass a local .jsonl/.json/.parquet/.csv/.txt file or folder, "
                        f"{DEFAULT_DATASET}, or a hub data set on a machine with hub access") from exc
    except ValueError as exc:
        if local and "corresponds to no data" in str(exc):  # datasets' words for a file without rows
            raise DataError(f"--dataset {dataset} has no rows: there is nothing to build a cache from") from exc
        if "config name is missing" in str(exc).lower() or "builderconfig" in str(exc).lower():
            raise DataError(f"--dataset {dataset} has several configurations: pass --dataset-config NAME "
                            f"({' '.join(str(exc).split())[:300]})") from exc
        if "split" in str(exc).lower():
            raise DataError(f"--dataset {dataset}: {exc}") from exc
        raise DataError(f"--dataset {dataset}: could not be loaded ({exc})") from exc
    except Exception as exc:  # datasets raises many types for malformed files and offline/missing hub data sets
        if local:
            root = exc
            while root.__cause__ is not None:  # datasets wraps the parser's own error, which names the bad row
                root = root.__cause__
            raise DataError(
                f"--dataset {dataset}: could not be read ({type(root).__name__}: {str(root)[:200]}); check that the file "
                f"is well-formed {'/'.join(sorted(LOCAL_SUFFIXES))} data"
            ) from exc
        raise DataError(
            f"--dataset {dataset}: could not be loaded ({type(exc).__name__}: {str(exc)[:200]}). It is not a local file or "
            f"folder; a hub data set needs network access. Pass a local file or {DEFAULT_DATASET}."
        ) from exc
    if len(ds) == 0:
        raise DataError(f"--dataset {dataset} has no rows: there is nothing to build a cache from")
    return ds, list(ds.column_names)


def text_sha256(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", errors="surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Tokenization


def _check_field(name: str | None, columns: list[str], option: str, dataset: str) -> None:
    if name is not None and name not in columns:
        raise DataError(f"{option} {name!r} is not a field of {dataset}; its fields are: {', '.join(columns)}")


def minillm_prompt(instruction: str, input_text: str | None = None) -> str:
    """MiniLLM's prompt text: the "### Input:" variant when input_text is non-empty."""
    if input_text:
        return MINILLM_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input_text)
    return MINILLM_TEMPLATE.format(instruction=instruction)


def resolve_template(tokenizer, template: str | None) -> str:
    """The template a build uses: `template`, or for None `chat` when the tokenizer has a chat template, else `plain`.

    Raises DataError for an unknown name and for `chat` with a tokenizer that has no chat template.
    """
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template is None:
        return "chat" if has_chat else "plain"
    if template not in PROMPT_TEMPLATES:
        raise DataError(f"--prompt-template {template!r} is unknown; choose one of {', '.join(PROMPT_TEMPLATES)}")
    if template == "chat" and not has_chat:
        raise DataError("--prompt-template chat: this tokenizer has no chat template; use --prompt-template plain or "
                        "minillm")
    return template


def prompt_only_ids(tokenizer, prompt: str, template: str | None = None, input_text: str | None = None) -> list[int]:
    """The ids a response follows (and a generation starts from): the prompt formatted by the template.

    template: one of PROMPT_TEMPLATES, or None (resolve_template's default). input_text: the minillm
    template's input (ignored by the others).
    """
    template = resolve_template(tokenizer, template)
    if template == "chat":
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    text = minillm_prompt(prompt, input_text) if template == "minillm" else PLAIN_TEMPLATE.format(prompt=prompt)
    return list(tokenizer(text)["input_ids"])


def prompt_ids_with_template(tokenizer, prompt: str, response: str, template: str | None = None,
                             input_text: str | None = None) -> tuple[list[int], list[int], str]:
    """(ids of the prompt up to where the response starts, ids of prompt + response, the template's name)."""
    template = resolve_template(tokenizer, template)
    prompt_ids = prompt_only_ids(tokenizer, prompt, template, input_text)
    if template == "chat":
        user = [{"role": "user", "content": prompt}]
        full_ids = list(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                                      tokenize=True, return_dict=False))
        if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
            return prompt_ids, full_ids, template
        # Templates that rewrite the prompt when a response follows: fall back to concatenation.
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return prompt_ids, prompt_ids + list(response_ids) + eos, template


def _check_template_options(template: str | None, input_field: str | None, pairs: bool) -> None:
    if template is not None and template not in PROMPT_TEMPLATES:
        raise DataError(f"--prompt-template {template!r} is unknown; choose one of {', '.join(PROMPT_TEMPLATES)}")
    if not pairs and (template is not None or input_field is not None):
        option = "--prompt-template" if template is not None else "--input-field"
        raise DataError(f"{option} applies to prompt/response data: give --prompt-field and --response-field too")
    if input_field is not None and template != "minillm":
        raise DataError(f"--input-field {input_field} is read by --prompt-template minillm only (its '### Input:' "
                        "section); add --prompt-template minillm, or drop --input-field")


def _row_input(row: dict, input_field: str | None) -> str | None:
    """The row's input text for the minillm template; None when there is no input field or it is empty."""
    if input_field is None or not row[input_field]:
        return None
    return str(row[input_field])


def load_sequences(dataset: str, tokenizer, *, split: str | None = None, config: str | None = None,
                   text_field: str | None = None,
                   prompt_field: str | None = None, response_field: str | None = None, max_length: int = 512,
                   limit: int | None = None, batch_rows: int = 256, prompt_template: str | None = None,
                   input_field: str | None = None) -> tuple[list[Sequence], DataInfo]:
    """Tokenize a data set into sequences (see the module docstring for the rules).

    `limit` caps the number of sequences (taken in data order); the data set is read only as far
    as needed. prompt_template / input_field: prompt/response data only (PROMPT_TEMPLATES; the input
    field with `minillm`). Raises DataError for unknown data sets, fields or templates and for an
    empty result.
    """
    if max_length < 2:
        raise DataError(f"--max-length must be >= 2 tokens, got {max_length}")
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be >= 1, got {limit}")
    if (prompt_field is None) != (response_field is None):
        raise DataError("--prompt-field and --response-field go together: give both for prompt/response data, or neither")
    pairs = prompt_field is not None
    _check_template_options(prompt_template, input_field, pairs)
    template = resolve_template(tokenizer, prompt_template) if pairs else None
    rows, columns = load_rows(dataset, split, config)
    if pairs:
        _check_field(prompt_field, columns, "--prompt-field", dataset)
        _check_field(response_field, columns, "--response-field", dataset)
        _check_field(input_field, columns, "--input-field", dataset)
        if text_field is not None:
            raise DataError("give either --text-field or --prompt-field/--response-field, not both")
        fields = {"prompt": prompt_field, "response": response_field, **({"input": input_field} if input_field else {})}
    else:
        text_field = text_field or "text"
        if text_field not in columns:
            raise DataError(
                f"--text-field {text_field!r} is not a field of {dataset}; its fields are: {', '.join(columns)}. "
                "Pass --text-field NAME, or --prompt-field/--response-field for prompt/response data."
            )
        fields = {"text": text_field}
    info = DataInfo(name=dataset_name(dataset), split=split, fields=fields, template=template, config=config)
    sequences: list[Sequence] = []

    def full() -> bool:
        return limit is not None and len(sequences) >= limit

    batch: list[tuple[int, dict]] = []
    if limit is not None:
        batch_rows = max(1, min(batch_rows, limit))

    def flush():
        if not batch:
            return
        if pairs:
            for index, row in batch:
                if full():
                    break
                _add_pair(sequences, info, tokenizer, index, row, prompt_field, response_field, max_length,
                          template, input_field)
        else:
            texts = [str(row[text_field] or "") for _, row in batch]
            encoded = tokenizer(texts)["input_ids"]
            for (index, _row), text, ids in zip(batch, texts, encoded):
                if full():
                    break
                _add_windows(sequences, info, index, text, ids, max_length, limit)
        batch.clear()

    for index, row in enumerate(rows):
        info.num_source_rows += 1
        batch.append((index, row))
        if len(batch) >= batch_rows:
            flush()
        if full():
            break
    flush()
    if limit is not None:
        del sequences[limit:]
    info.num_windows = len(sequences)
    if not sequences:
        raise DataError(
            f"{dataset} gave no sequences to train on ({info.num_source_rows} rows read, {info.num_skipped_rows} skipped); "
            "check the data set, --split, the fields and --max-length"
        )
    return sequences, info


def _add_windows(out: list[Sequence], info: DataInfo, index: int, text: str, ids: list[int], max_length: int,
                 limit: int | None) -> None:
    digest = text_sha256(text)
    for w, start in enumerate(range(0, len(ids), max_length)):
        window = np.asarray(ids[start : start + max_length], dtype=np.int64)
        if len(window) < 2:
            info.num_dropped += len(window)
            continue
        mask = np.ones(len(window), dtype=bool)
        mask[-1] = False
        out.append(Sequence(window, mask, source_index=index, window_index=w, text_sha256=digest))
        if limit is not None and len(out) >= limit:
            return
    if not ids:
        info.num_skipped_rows += 1


def _sha_parts(prompt: str, response: str, input_field: str | None, input_text: str | None) -> tuple[str, ...]:
    """What a pair's text_sha256 hashes: prompt and response, and the input when there is an input field."""
    return (prompt, response) if input_field is None else (prompt, response, input_text or "")


def _add_pair(out: list[Sequence], info: DataInfo, tokenizer, index: int, row: dict, prompt_field: str,
              response_field: str, max_length: int, template: str, input_field: str | None) -> None:
    prompt, response = str(row[prompt_field] or ""), str(row[response_field] or "")
    input_text = _row_input(row, input_field)
    prompt_ids, full_ids, _ = prompt_ids_with_template(tokenizer, prompt, response, template, input_text)
    if len(prompt_ids) >= max_length - 1 or len(full_ids) <= len(prompt_ids):
        info.num_skipped_rows += 1
        info.num_dropped += len(full_ids)
        return
    if len(full_ids) > max_length:
        info.num_truncated += len(full_ids) - max_length
        full_ids = full_ids[:max_length]
    ids = np.asarray(full_ids, dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    mask[len(prompt_ids) - 1 : len(ids) - 1] = True  # rows whose next token is a response token
    out.append(Sequence(ids, mask, source_index=index, prompt_length=len(prompt_ids),
                        text_sha256=text_sha256(*_sha_parts(prompt, response, input_field, input_text)),
                        reference=response))


def load_prompts(dataset: str, tokenizer, *, split: str | None = None, config: str | None = None, prompt_field: str,
                 response_field: str | None = None, max_length: int = 512, limit: int | None = None,
                 prompt_template: str | None = None, input_field: str | None = None) -> tuple[list[Sequence], DataInfo]:
    """Prompts to generate from (generate mode, evaluation): ids of the formatted prompt only (prompt_only_ids)."""
    _check_template_options(prompt_template, input_field, True)
    template = resolve_template(tokenizer, prompt_template)
    rows, columns = load_rows(dataset, split, config)
    _check_field(prompt_field, columns, "--prompt-field", dataset)
    _check_field(response_field, columns, "--response-field", dataset)
    _check_field(input_field, columns, "--input-field", dataset)
    fields = {"prompt": prompt_field, "response": response_field, **({"input": input_field} if input_field else {})}
    info = DataInfo(name=dataset_name(dataset), split=split, fields=fields, template=template, config=config)
    out: list[Sequence] = []
    for index, row in enumerate(rows):
        info.num_source_rows += 1
        prompt = str(row[prompt_field] or "")
        reference = str(row[response_field]) if response_field else None
        input_text = _row_input(row, input_field)
        ids = prompt_only_ids(tokenizer, prompt, template, input_text)
        if len(ids) >= max_length:
            info.num_skipped_rows += 1
            continue
        out.append(Sequence(np.asarray(ids, dtype=np.int64), np.zeros(len(ids), dtype=bool), source_index=index,
                            prompt_length=len(ids),
                            text_sha256=text_sha256(*_sha_parts(prompt, reference or "", input_field, input_text)),
                            reference=reference))
        if limit is not None and len(out) >= limit:
            break
    info.num_windows = len(out)
    if not out:
        raise DataError(f"{dataset} gave no prompts shorter than --max-length {max_length}")
    return out, info


# ---------------------------------------------------------------------------------------------
# Fingerprint and shard plan


def sequences_fingerprint(sequences) -> str:
    """sha256 over every sequence's tokens and loss mask, in order (manifest dataset.fingerprint)."""
    h = hashlib.sha256()
    for seq in sequences:
        ids = np.asarray(seq.input_ids, dtype=np.int64)
        h.update(len(ids).to_bytes(8, "little"))
        h.update(ids.tobytes())
        h.update(np.packbits(np.asarray(seq.loss_mask, dtype=bool)).tobytes())
    return h.hexdigest()


def plan_shards(lengths, shard_tokens: int) -> list[list[int]]:
    """Consecutive sequences per shard, each shard holding at most shard_tokens rows (at least one sequence).

    The plan depends only on the sequence lengths and shard_tokens, never on the number of workers.
    """
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    shards: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, n in enumerate(lengths):
        if current and size + n > shard_tokens:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += int(n)
    if current:
        shards.append(current)
    return shards


_NUMBER = r"-?[\d,]*\.?\d+"
# The content of a \boxed{...}, allowing one level of nested braces (\boxed{\frac{1}{2}}, \boxed{\text{5}}).
_BOXED = r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}"


def _normalize_number(text: str) -> str | None:
    """The first number in text, '$' and ',' removed, trailing zeros of a decimal dropped ('3.50' -> '3.5')."""
    import re

    match = re.search(_NUMBER, text.replace("$", ""))
    if not match:
        return None
    number = match.group(0).replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".") or "0"
    return number


def gsm8k_final_answer(text: str | None) -> tuple[str | None, str | None]:
    """(the final answer of a GSM8K-style solution, how it was written: '####', 'boxed' or None).

    The number after the last '####'; when there is none (no '####', or no number after it), the number
    in the last \\boxed{...} (instruct models trained on MATH-style data answer that way). Normalized:
    '#### 1,234' -> '1234', '#### -3.50' -> '-3.5', '\\boxed{\\$4.50}' -> '4.5'.
    """
    import re

    if not text:
        return None, None
    if "####" in text:
        number = _normalize_number(text.rsplit("####", 1)[1])
        if number is not None:
            return number, "####"
    boxed = re.findall(_BOXED, text)
    number = _normalize_number(boxed[-1]) if boxed else None
    return (number, "boxed") if number is not None else (None, None)


def extract_gsm8k_answer(text: str | None) -> str | None:
    """The final answer of a GSM8K-style solution (gsm8k_final_answer): after the last '####', else in the
    last \\boxed{...}; None when there is neither. Used by `--filter gsm8k-answer` and the gsm8k metric."""
    return gsm8k_final_answer(text)[0]
