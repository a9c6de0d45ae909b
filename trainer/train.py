"""`kdtrain run`: train a student from a teacher cache (or a plain data set) in one explicit loop.

`train(config)` reads top to bottom: prepare --out, open and verify the cache, build the student and
check its tokenizer, split off the held-out sequences, start the prefetching batcher, restore a
checkpoint, then the loop (forward, sparse KD loss, backward, clip, step, log, evaluate, checkpoint),
then save the student as a plain Hugging Face folder in --out with run.json beside it.

- Loss per micro-batch is the masked mean over its loss tokens (trainer/losses.py); with --grad-accum
  the micro-batches are averaged, and under DDP the ranks are.
- `--loss ce` with a cache trains on the cache's tokens in the same order and ignores the teacher's
  log-probs (the fair baseline); its held-out metrics still include eval_kl and eval_top1_agreement
  against the cache's teacher, so it compares with the KD runs. Without a cache, `--dataset` is tokenized
  with the student's tokenizer (common.sequences.load_sequences) and the same loop trains cross-entropy.
- The loss and the held-out metrics see the student's logits of token ids only (trainer.student.cache_token_ids:
  the cache's vocab_size, which kdcache build sets to the tokenizer's size; without a cache the tokenizer's
  size): padded embedding rows beyond them (Qwen2.5-0.5B: 151936 rows for 151665 ids) never enter a softmax,
  so a student whose padding differs from the teacher's trains on the same outcomes.
- Under `torchrun` every rank trains on its own stripe of blocks (trainer/data.py) with DDP (gloo on
  CPU; nccl on CUDA, rank r of a node on cuda:LOCAL_RANK); rank 0 logs, evaluates and saves.
- `--resume` continues from the latest checkpoint only under the settings it was written with (data
  order, loss, optimizer, schedule; the student's weights must fit the checkpoint key for key). A larger
  --steps is allowed: the learning-rate schedule keeps the horizon the run started with, so the extra
  steps run at its final value (10% of --lr). Without a complete checkpoint, `--resume` on a run folder
  starts over from step 0, first deleting what this tool wrote there (RESTART_CLEARS), and says so.

Knows models, losses, the cache reader and the data path; never imports the cacher.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from shared.format import CacheError
from shared.reader import CacheReader
from trainer.checkpoint import (
    CHECKPOINTS_DIR,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from trainer.data import (
    Batcher,
    Source,
    cache_index,
    cache_source,
    collate,
    epoch_order,
    heldout_hash,
    heldout_mask,
    pack_batches,
    sequence_source,
)
from trainer.divergences import EmptyTeacherRowError
from trainer.losses import (
    LOSSES,
    LossOptions,
    cross_entropy_loss,
    sparse_kd_loss,
    tail_sample_targets,
)
from trainer.metrics import METRICS_FILE, MetricsLog

# Caches up to this size are hashed completely before training starts (a few seconds per GiB);
# larger ones are hashed shard by shard the first time a shard is read (CacheReader verify_on_read),
# still before any of its rows is trained on.
VERIFY_ALL_BYTES = 4 * 2**30
# Chunk-aligned blocks whose sequences are shuffled together (trainer/data.py).
SHUFFLE_WINDOW_BLOCKS = 4
# Any of these in --out marks it as a kdtrain run folder (the only kind --overwrite deletes or --resume enters).
RUN_MARKERS = ("run.json", METRICS_FILE, CHECKPOINTS_DIR, "model.safetensors", "model.safetensors.index.json")
# What `--resume` without a complete checkpoint deletes before starting over: everything a run writes as it
# goes (the final model files are written only at the end and are replaced then).
RESTART_CLEARS = (METRICS_FILE, "run.json", CHECKPOINTS_DIR, "trace", "tensorboard")


class TrainError(ValueError):
    """A run that cannot start as asked; the message says what to change."""


@dataclass
class TrainConfig:
    """Settings of one `kdtrain run` (each field's docstring is its --help text)."""

    out: str
    """Output folder: the student (save_pretrained), metrics.jsonl, run.json, checkpoints/."""
    cache: str | None = None
    """Teacher cache (folder or URL). Without it, --dataset trains plain cross-entropy."""
    student: str | None = None
    """Student: a hub id or local model folder."""
    student_from_teacher: bool = False
    """Student = the cache's teacher keeping --keep-layers evenly spaced layers."""
    keep_layers: int | None = None
    """Layers kept by --student-from-teacher."""
    student_config: str | None = None
    """Student = random init from this JSON config (with model_type); uses the teacher's tokenizer."""
    teacher: str | None = None
    """Teacher folder for --student-from-teacher / --student-config (default: the cache's teacher.path)."""
    loss: str = "fkl"
    """fkl | rkl | jsd | skl | srkl | tvd | ce."""
    alpha: float = 0.0
    """Weight of cross-entropy on the real next token: alpha * CE + (1 - alpha) * T^2 * KD."""
    temperature: float = 1.0
    """Distillation temperature (both distributions re-tempered; see docs/losses.md)."""
    beta: float = 0.5
    """JSD mixing weight, in (0, 1)."""
    skew: float = 0.1
    """Skew of skl / srkl (DistiLLM), in [0, 1)."""
    target_bucket: bool = True
    """Give the actual next token its own bucket where it is outside the teacher's top K (K + 2 outcomes;
    uses the cache's target_logprob; docs/losses.md). Off: K + 1 buckets. Not used with tail samples."""
    tail_samples: bool = True
    """Use the cache's tail samples (a cache built with --tail-samples) with loss fkl: the K top-K entries plus
    M importance-weighted draws from the tail replace the rest bucket (docs/losses.md). Ignored otherwise."""
    steps: int | None = None
    """Optimizer steps (default: --epochs over the training sequences). With --resume it may grow: the extra
    steps run at the schedule's final learning rate."""
    epochs: float = 1.0
    """Passes over the training sequences when --steps is not given."""
    lr: float = 5e-4
    """Peak learning rate (AdamW, betas 0.9/0.95)."""
    warmup_steps: int = 0
    """Linear warm-up steps; then cosine decay to 10% of --lr."""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)."""
    batch_tokens: int = 4096
    """Padded tokens (rows x longest sequence) per micro-batch per rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    clip: float = 1.0
    """Gradient-norm clip (0 = off)."""
    bf16: bool = False
    """bfloat16 autocast for the student's forward."""
    seed: int = 0
    """Seed of the data order and of a random student init."""
    eval_every: int = 0
    """Evaluate every N steps, and at step 0 (0: only at the end)."""
    eval_fraction: float = 0.05
    """Fraction of sequences held out for evaluation (rule in trainer/data.py)."""
    eval_max_sequences: int = 64
    """At most this many held-out sequences per evaluation (the first ones in storage order)."""
    log_every: int = 1
    """Write a metrics line every N steps."""
    save_every: int = 0
    """Checkpoint every N steps (0: none besides the final model)."""
    resume: bool = False
    """Continue from the latest checkpoint in --out (same settings); without one, start the run in --out over."""
    overwrite: bool = False
    """Replace a non-empty --out that holds a kdtrain run."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to <out>/tensorboard (needs the tensorboard package)."""
    dataset: str | None = None
    """No-cache path: data set to train on with --loss ce (tokenized with the student's tokenizer)."""
    split: str | None = None
    """No-cache path: split."""
    text_field: str | None = None
    """No-cache path: text field."""
    prompt_field: str | None = None
    """No-cache path: prompt field."""
    response_field: str | None = None
    """No-cache path: response field."""
    prompt_template: str | None = None
    """No-cache path: prompt format of prompt/response data, as `kdcache build --prompt-template` (chat, plain,
    minillm; default chat when the tokenizer has a chat template, else plain)."""
    input_field: str | None = None
    """No-cache path: with --prompt-template minillm, the field of its '### Input:' section (dolly's context)."""
    max_length: int = 256
    """No-cache path: window length."""
    limit: int | None = None
    """No-cache path: first N source rows only."""
    stop_after: int | None = None
    """Checkpoint and stop after this step, as if killed (tests of --resume)."""
    trace_data: bool = False
    """Write the (shard, sequence) ids each rank trains on to <out>/trace/rank-R.jsonl."""

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise TrainError(f"--loss {self.loss!r} is unknown; choose one of {', '.join(LOSSES)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise TrainError(f"--alpha must be in [0, 1] (it weighs CE against KD), got {self.alpha}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise TrainError(f"--temperature must be > 0 (1.0 means no tempering), got {self.temperature}")
        if self.loss == "jsd" and not 0.0 < self.beta < 1.0:
            raise TrainError(f"--beta must be in (0, 1) for --loss jsd (at 0 or 1 the JSD is 0), got {self.beta}")
        if self.loss in ("skl", "srkl") and not 0.0 <= self.skew < 1.0:
            raise TrainError(f"--skew must be in [0, 1) for --loss {self.loss}, got {self.skew}")
        chosen = [name for name, value in (("--student", self.student), ("--student-from-teacher", self.student_from_teacher),
                                           ("--student-config", self.student_config)) if value]
        if len(chosen) != 1:
            raise TrainError("give exactly one of --student, --student-from-teacher (with --keep-layers), --student-config"
                             + (f"; got {' and '.join(chosen)}" if chosen else "; got none"))
        if self.student_from_teacher and (self.keep_layers is None or self.keep_layers < 1):
            raise TrainError("--student-from-teacher needs --keep-layers N (N >= 1)")
        if self.keep_layers is not None and not self.student_from_teacher:
            raise TrainError("--keep-layers only applies to --student-from-teacher")
        if self.cache is None and self.dataset is None:
            raise TrainError("give --cache (distillation) or --dataset (plain cross-entropy with --loss ce)")
        if self.cache is not None and self.dataset is not None:
            raise TrainError("give --cache or --dataset, not both (--loss ce with --cache trains on the cache's tokens)")
        if self.cache is not None and (self.prompt_template is not None or self.input_field is not None):
            raise TrainError("--prompt-template and --input-field format --dataset's prompts; a cache's prompts were "
                             "formatted when it was built (kdcache build --prompt-template)")
        if self.cache is None and self.loss != "ce":
            raise TrainError(f"without --cache there is no teacher: use --loss ce (got --loss {self.loss})")
        if self.cache is None and (self.student_from_teacher or self.student_config) and self.teacher is None:
            raise TrainError("without --cache, --student-from-teacher and --student-config need --teacher FOLDER")
        if self.steps is not None and self.steps < 1:
            raise TrainError(f"--steps must be >= 1, got {self.steps}")
        for name, value, low in (("--epochs", self.epochs, 0), ("--lr", self.lr, 0)):
            if not value > low:
                raise TrainError(f"{name} must be > {low}, got {value}")
        for name, value, low in (("--batch-tokens", self.batch_tokens, 2), ("--grad-accum", self.grad_accum, 1),
                                 ("--log-every", self.log_every, 1), ("--warmup-steps", self.warmup_steps, 0),
                                 ("--eval-every", self.eval_every, 0), ("--save-every", self.save_every, 0),
                                 ("--max-length", self.max_length, 2), ("--clip", self.clip, 0),
                                 ("--weight-decay", self.weight_decay, 0)):
            if value < low:
                raise TrainError(f"{name} must be >= {low}, got {value}")
        if not 0 <= self.eval_fraction < 1:
            raise TrainError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.resume and self.overwrite:
            raise TrainError("--resume and --overwrite contradict each other; pass one")


# ---------------------------------------------------------------------------------------------
# setup helpers


def select_device(env, *, cuda_available: bool, num_cuda_devices: int) -> torch.device:
    """This process's device: cuda:LOCAL_RANK on a CUDA machine (torchrun sets LOCAL_RANK; alone it is 0), else cpu.

    env: the environment (os.environ). A pure function of its arguments, so tests can call it directly.
    """
    if not cuda_available:
        return torch.device("cpu")
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if not 0 <= local_rank < num_cuda_devices:
        raise TrainError(f"LOCAL_RANK={local_rank} but this machine shows {num_cuda_devices} CUDA device(s), so that "
                         f"rank has no GPU of its own: start at most {num_cuda_devices} processes per node "
                         "(torchrun --nproc_per_node) or check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", local_rank)


def _dist() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); binds the process to its GPU, then joins the process group under torchrun."""
    device = select_device(os.environ, cuda_available=torch.cuda.is_available(),
                           num_cuda_devices=torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: nccl uses the current device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world, device


def _ddp(model, device: torch.device):
    """The model wrapped in DistributedDataParallel, on its own GPU on CUDA (else every rank would use cuda:0)."""
    if device.type == "cuda":
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
    return torch.nn.parallel.DistributedDataParallel(model)


def _prepare_out(config: TrainConfig, rank: int, log) -> None:
    """Check --out against --resume/--overwrite (every rank checks; rank 0 acts).

    A non-empty --out is used only when it holds a kdtrain run (RUN_MARKERS): --overwrite deletes it,
    --resume continues it, or, without a complete checkpoint, clears RESTART_CLEARS and starts over.
    """
    if os.path.isfile(config.out):
        raise TrainError(f"--out {config.out} is a file; pass a folder")
    entries = set(os.listdir(config.out)) if os.path.isdir(config.out) else set()
    is_run = bool(entries & set(RUN_MARKERS))
    if entries and not is_run:
        markers = ", ".join(RUN_MARKERS)
        if config.overwrite:
            raise TrainError(f"--overwrite: --out {config.out} does not look like a kdtrain run folder (none of {markers}), "
                             f"so kdtrain will not delete it; delete {config.out} by hand if you mean to replace it, "
                             "or pass another --out")
        raise TrainError(f"--out {config.out} is not empty and holds no kdtrain run (none of {markers}); pass a new or "
                         "empty folder")
    if entries and not (config.resume or config.overwrite):
        raise TrainError(f"--out {config.out} is not empty; pass --resume to continue the run in it or --overwrite "
                         "to replace it")
    if rank == 0:
        if config.overwrite and entries:
            shutil.rmtree(config.out)
        elif config.resume and entries and latest_checkpoint(config.out) is None:
            removed = sorted(entries & set(RESTART_CLEARS))
            for name in removed:
                path = os.path.join(config.out, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
            log(f"--resume: {config.out} holds no complete checkpoint (the run there stopped before its first one, "
                f"or saved none); starting over from step 0 (deleted {', '.join(removed) or 'nothing'})")
        elif config.resume and not entries:
            log(f"--resume: no checkpoint in {config.out} yet; starting from step 0")
        os.makedirs(config.out, exist_ok=True)


def _open_cache(config: TrainConfig, log) -> CacheReader:
    try:
        reader = CacheReader(config.cache, verify_on_read=True)
        num_bytes = reader.manifest.totals["num_bytes"]
        if num_bytes <= VERIFY_ALL_BYTES:
            started = time.time()
            problems = reader.verify()
            if problems:
                raise TrainError(f"cache {config.cache} is damaged, refusing to train on it: "
                                 + "; ".join(str(p) for p in problems[:5])
                                 + ". Rebuild the named shards (rerun the same `kdcache build`) or use another cache.")
            reader.verify_on_read = False  # every object was just hashed
            log(f"verified every object of {config.cache} ({num_bytes / 2**20:.1f} MiB) in {time.time() - started:.1f}s")
    except CacheError as exc:
        raise TrainError(f"cannot train from {config.cache}: {exc}") from exc
    if reader.manifest.totals["num_loss_tokens"] == 0:
        raise TrainError(f"cache {config.cache} has no rows with loss_mask set, so there is nothing to distill; "
                         "rebuild it from data with response tokens (check --prompt-field/--response-field)")
    return reader


def _teacher_path(config: TrainConfig, reader: CacheReader | None) -> str | None:
    """The teacher folder a student is made from (--teacher, else the cache's teacher.path)."""
    if config.teacher:
        if not os.path.isdir(config.teacher):
            raise TrainError(f"--teacher {config.teacher} is not a folder")
        return config.teacher
    if reader is not None and (config.student_from_teacher or config.student_config):
        path = reader.manifest.teacher.get("path")
        if not (path and os.path.isdir(path)):
            raise TrainError(f"the cache's teacher folder {path!r} is not on this machine (the cache was built "
                             "elsewhere); pass --teacher FOLDER")
        return path
    return None


def _build_student(config: TrainConfig, teacher_path: str | None, vocab_size: int | None):
    """(model, tokenizer, name) from --student, --student-from-teacher or --student-config."""
    from common.tokenizers import tokenizer_of
    from trainer.student import load_student, student_from_config, student_from_teacher

    torch.manual_seed(config.seed)
    try:
        if config.student:
            return load_student(config.student), tokenizer_of(config.student), config.student
        tokenizer = tokenizer_of(teacher_path)
        if config.student_from_teacher:
            return (student_from_teacher(teacher_path, config.keep_layers), tokenizer,
                    f"{teacher_path} keeping {config.keep_layers} layers")
        return student_from_config(config.student_config, vocab_size or len(tokenizer)), tokenizer, config.student_config
    except (FileNotFoundError, OSError) as exc:
        raise TrainError(str(exc)) from exc


def _schedule(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up, then cosine from 1 to 0.1."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _flat(batch: dict, key: str) -> torch.Tensor:
    t = batch[key]
    return t.reshape(-1, *t.shape[2:])  # (B, L, ...) -> (B*L, ...)


def token_logits(logits: torch.Tensor, num_ids: int | None) -> torch.Tensor:
    """(..., V') logits -> (..., V) the first num_ids columns (a view): a student's padded rows beyond the token
    ids (cache_token_ids) never reach a loss or a metric. None or num_ids >= V' keeps every column."""
    return logits if num_ids is None or num_ids >= logits.shape[-1] else logits[..., :num_ids]


def _loss(model, batch: dict, config: TrainConfig, num_ids: int | None = None) -> tuple[torch.Tensor, dict]:
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V')
    logits = token_logits(logits, num_ids)  # (B, L, V)
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (B*L, V); a view also when cut (rows of stride V')
    targets, mask = _flat(batch, "target_ids"), _flat(batch, "loss_mask")
    if config.loss == "ce":
        ce = cross_entropy_loss(flat_logits, targets, mask)
        return ce, {"ce": ce.detach(), "kd": torch.zeros(())}
    teacher = {k: _flat(batch, k) for k in batch if k in TEACHER_FIELDS}
    with _naming_rows(batch, torch.arange(mask.numel()), config.cache):
        return _sparse_loss(flat_logits, teacher, targets, mask, config)


TEACHER_FIELDS = ("topk_ids", "topk_logprobs", "tail_logprob", "target_logprob", "tail_ids", "tail_counts")


@contextlib.contextmanager
def _naming_rows(batch: dict, positions: torch.Tensor, cache: str | None):
    """Turn an EmptyTeacherRowError of the loss into a TrainError naming the cache sequence and token.

    positions: (N,) the flattened (B*L) index in `batch` of each of the N rows given to the loss.
    """
    try:
        yield
    except EmptyTeacherRowError as exc:
        b, t = divmod(int(positions[exc.row]), batch["loss_mask"].shape[1])
        ids = batch.get("ids")
        where = f"shard {ids[b][0]} sequence {ids[b][1]}" if ids else f"batch row {b}"
        raise TrainError(f"cache {cache}, {where}, token {t}: the teacher's stored log-probs hold no "
                         "probability (all -inf, or NaN), so there is nothing to distill there; a cache writer must "
                         "never store such a row: rebuild the cache (or that shard) with `kdcache build`") from exc


def _sparse_loss(rows: torch.Tensor, teacher: dict, targets: torch.Tensor, mask: torch.Tensor, config: TrainConfig):
    """sparse_kd_loss on (N, V) logits and the teacher's (N, ...) fields, as the config asks.

    With tail samples in `teacher` (present only for loss fkl, see _split_data): K + M outcomes with an
    empty rest bucket and no target bucket; else K + 2 (target bucket) or K + 1 outcomes.
    """
    ids, top_lp, tail = teacher["topk_ids"], teacher["topk_logprobs"], teacher["tail_logprob"]
    target_lp = teacher["target_logprob"] if config.target_bucket else None
    if "tail_ids" in teacher:
        ids, top_lp, tail = tail_sample_targets(ids, top_lp, tail, teacher["tail_ids"], teacher["tail_counts"])
        target_lp = None
    return sparse_kd_loss(rows, ids, top_lp, tail, targets, mask, loss_options(config), target_logprob=target_lp)


def loss_options(config: TrainConfig) -> LossOptions:
    """The run's loss settings as the losses take them."""
    return LossOptions(loss=config.loss, alpha=config.alpha, temperature=config.temperature, beta=config.beta,
                       skew=config.skew)


def heldout_kl(rows: torch.Tensor, teacher: dict, targets: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over the K + 1 buckets at T = 1: sparse_kd_loss's KD term, rules and all.

    rows: (N, V) student logits of token ids only (token_logits); teacher: the cache's (N, ...) topk_ids,
    topk_logprobs, tail_logprob; targets: (N,) next tokens. The rest bucket is empty on rows whose K ids
    cover all V (K = V), whatever rounding left in the stored tail. Also kdtrain eval's agreement KL.
    """
    everything = torch.ones_like(targets, dtype=torch.bool)
    _, stats = sparse_kd_loss(rows, teacher["topk_ids"], teacher["topk_logprobs"], teacher["tail_logprob"], targets,
                              everything, LossOptions(loss="fkl"))
    return stats["kd"]


@torch.no_grad()
def evaluate_heldout(model, batches: list[dict], config: TrainConfig | None, has_teacher: bool,
                     num_ids: int | None = None) -> dict:
    """Held-out metrics over the loss rows of `batches`, one mean per token.

    eval_loss: the training objective. eval_ppl: exp(mean CE of the real next tokens).
    With a teacher (whatever the training loss, --loss ce included): eval_kl = KL(teacher || student) over
    the K+1 buckets at T=1, and eval_top1_agreement = fraction of rows where the student's argmax is the
    teacher's top-1. config may be None without a teacher. num_ids: the token ids the loss sees (token_logits).
    """
    device = next(model.parameters()).device
    model.eval()
    loss_sum = ce_sum = kl_sum = 0.0
    agree = count = 0
    for batch in batches:
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        mask = batch["loss_mask"]  # (B, L)
        num = int(mask.sum())
        if num == 0:
            continue
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        rows = token_logits(logits, num_ids)[mask]  # (M, V)
        targets = batch["target_ids"][mask]  # (M,)
        ce = float(torch.nn.functional.cross_entropy(rows, targets, reduction="sum"))
        ce_sum += ce
        objective_sum = ce
        if has_teacher:
            teacher = {k: batch[k][mask] for k in batch if k in TEACHER_FIELDS}
            with _naming_rows(batch, mask.reshape(-1).nonzero().squeeze(1).cpu(), config.cache):
                kl_sum += float(heldout_kl(rows, teacher, targets)) * num
                if config.loss != "ce":
                    objective, _ = _sparse_loss(rows, teacher, targets, torch.ones_like(targets, dtype=torch.bool),
                                                config)
                    objective_sum = float(objective) * num
            agree += int((rows.argmax(-1) == teacher["topk_ids"][:, 0]).sum())
        loss_sum += objective_sum
        count += num
    model.train()
    if count == 0:
        return {}
    out = {"eval_loss": loss_sum / count, "eval_ppl": math.exp(ce_sum / count), "eval_tokens": count}
    if has_teacher:
        out.update(eval_kl=kl_sum / count, eval_top1_agreement=agree / count)
    return out


def _split_data(config: TrainConfig, reader: CacheReader | None, tokenizer) -> tuple[Source, Source, dict]:
    """(training source, evaluation source, description) by the held-out rule of trainer/data.py."""
    if reader is not None:
        try:
            index = cache_index(reader)
        except CacheError as exc:
            raise TrainError(f"cannot train from {config.cache}: {exc}") from exc
        held = heldout_mask(index.hashes, config.eval_fraction)
        tail = _uses_tail_samples(config, reader)
        # --loss ce trains without the teacher's arrays, but is evaluated against them like every KD run
        train_src = cache_source(reader, index, np.flatnonzero(~held).tolist(), has_teacher=config.loss != "ce",
                                 window_blocks=SHUFFLE_WINDOW_BLOCKS, tail_samples=tail)
        eval_src = cache_source(reader, index, np.flatnonzero(held)[: config.eval_max_sequences].tolist(),
                                has_teacher=True, tail_samples=tail)
        info = {"num_sequences": len(index), "num_heldout": int(held.sum()),
                "teacher_outcomes": _outcomes_note(config, reader.manifest.top_k, reader.manifest.tail_samples, tail)}
    else:
        from common.sequences import load_sequences

        sequences, data_info = load_sequences(
            config.dataset, tokenizer, split=config.split, text_field=config.text_field,
            prompt_field=config.prompt_field, response_field=config.response_field, max_length=config.max_length,
            limit=config.limit, prompt_template=config.prompt_template, input_field=config.input_field)
        held = heldout_mask(np.asarray([heldout_hash(s.text_sha256, s.window_index, s.source_index) for s in sequences],
                                       dtype=np.int64), config.eval_fraction)
        train_src = sequence_source(sequences, np.flatnonzero(~held).tolist())
        eval_src = sequence_source(sequences, np.flatnonzero(held)[: config.eval_max_sequences].tolist())
        info = {"num_sequences": len(sequences), "num_heldout": int(held.sum()), "data": data_info.to_json()}
    if len(train_src) == 0:
        raise TrainError(f"no training sequences left after holding out {info['num_heldout']} of {info['num_sequences']} "
                         "for evaluation; use more data or a smaller --eval-fraction")
    return train_src, eval_src, info


def _uses_tail_samples(config: TrainConfig, reader: CacheReader | None) -> bool:
    """Whether the loss trains on the cache's tail samples: a cache that has them, --tail-samples, --loss fkl."""
    return bool(reader is not None and reader.manifest.tail_samples and config.tail_samples and config.loss == "fkl")


def _outcomes_note(config: TrainConfig, top_k: int, tail_samples: int, used: bool) -> str:
    """One line on what the KD loss compares (logged at start, kept in run.json)."""
    if config.loss == "ce":
        return "cross-entropy only"
    if used:
        return f"top-{top_k} + {tail_samples} importance-weighted tail samples (forward KL)"
    why = ""
    if tail_samples and config.tail_samples:
        why = f"; the cache's {tail_samples} tail samples are unused: they estimate forward KL only (--loss fkl)"
    elif tail_samples:
        why = f"; the cache's {tail_samples} tail samples are unused (--no-tail-samples)"
    buckets = f"top-{top_k} + rest bucket" + (" + target bucket" if config.target_bucket else "")
    return buckets + why


def _training_settings(config: TrainConfig, reader: CacheReader | None) -> dict:
    """The settings besides the data order that a bit-exact resume depends on (kept in each checkpoint)."""
    return {"loss": config.loss, "alpha": config.alpha, "temperature": config.temperature,
            "beta": config.beta if config.loss == "jsd" else None,
            "skew": config.skew if config.loss in ("skl", "srkl") else None,
            "target_bucket": config.target_bucket, "tail_samples": _uses_tail_samples(config, reader),
            "lr": config.lr, "warmup_steps": config.warmup_steps, "weight_decay": config.weight_decay,
            "clip": config.clip, "grad_accum": config.grad_accum, "bf16": config.bf16}


def _check_resume_state(state: dict, data_state: dict, training: dict, total_steps: int, path: str) -> int:
    """Refuse a checkpoint written under other settings; returns the LR schedule's horizon in steps.

    The data cursor only means something under the same order settings, the optimizer and scheduler
    states only under the same loss and optimizer settings. --steps may grow (the schedule keeps its
    horizon, so the extra steps run at its final LR) but not shrink. Keys a checkpoint lacks (written
    by an older kdtrain) are not checked.
    """
    def differing(saved: dict, now: dict) -> str:
        return "; ".join(f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if k in saved and saved[k] != v)

    diffs = differing(state.get("data", {}), data_state)
    if diffs:
        raise TrainError(f"checkpoint {path} was written with other data settings ({diffs}); resume with "
                         "the same --seed/--batch-tokens/--eval-fraction/data and number of processes, or start over "
                         "with --overwrite")
    diffs = differing(state.get("train", {}), training)
    if diffs:
        raise TrainError(f"checkpoint {path} was written with other training settings ({diffs}); a resumed run "
                         "continues the same run only with the same loss, --alpha, --temperature, --beta/--skew, target "
                         "bucket, tail samples, --lr, --warmup-steps, --weight-decay, --clip, --grad-accum and --bf16: "
                         "resume with the values the run started with, or start over with --overwrite")
    horizon = state.get("schedule_steps", total_steps)
    if total_steps < horizon:
        raise TrainError(f"checkpoint {path} belongs to a run of {horizon} steps; {total_steps} steps would cut its "
                         f"learning-rate schedule short: pass --steps {horizon} or more (steps past {horizon} run at "
                         "the final learning rate), or start over with --overwrite")
    return horizon


# ---------------------------------------------------------------------------------------------
# the run


def train(config: TrainConfig, *, progress=None, log=print) -> dict:
    """Run training; returns the final summary (also written to <out>/run.json).

    progress: optional factory `progress(total_steps, start_step) -> tick(step=, loss=, tps=)` (rank 0).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    rank, world, device = _dist()
    log = log if rank == 0 else (lambda message: None)
    _prepare_out(config, rank, log)
    if world > 1:
        torch.distributed.barrier()

    # -- cache, student, data ------------------------------------------------------------------
    reader = _open_cache(config, log) if config.cache else None
    teacher_path = _teacher_path(config, reader)
    from trainer.student import cache_token_ids, check_tokenizer_matches

    num_ids = cache_token_ids(reader.manifest.tokenizer) if reader else None
    model, tokenizer, student_name = _build_student(config, teacher_path, num_ids)
    rows = model.get_input_embeddings().weight.shape[0]
    if reader is not None:
        try:
            check_tokenizer_matches(tokenizer, reader.manifest.tokenizer["vocab_sha256"], num_ids,
                                    num_student_embeddings=rows, student_name=student_name,
                                    teacher_name=reader.manifest.teacher.get("name", "?"),
                                    tokenizer_size=reader.manifest.tokenizer.get("tokenizer_size"))
        except ValueError as exc:
            raise TrainError(str(exc)) from exc
    else:
        num_ids = min(rows, len(tokenizer))
    if num_ids < model.get_output_embeddings().weight.shape[0]:
        log(f"student: {model.get_output_embeddings().weight.shape[0]} logit rows for {num_ids} token ids; the loss "
            f"sees the first {num_ids} (the rest are padding no tokenizer produces)")
    train_src, eval_src, data_info = _split_data(config, reader, tokenizer)
    if "teacher_outcomes" in data_info:
        log(f"teacher targets: {data_info['teacher_outcomes']}")
    eval_batches = [{**collate(eval_src.read(list(range(a, b))), eval_src.has_teacher), "ids": eval_src.ids[a:b]}
                    for a, b in pack_batches(eval_src.lengths, config.batch_tokens)]
    data_state = {"seed": config.seed, "batch_tokens": config.batch_tokens, "eval_fraction": config.eval_fraction,
                  "num_train_sequences": len(train_src), "world_size": world,
                  "cache_key": reader.manifest.cache_key if reader else None}
    training = _training_settings(config, reader)

    # -- steps ---------------------------------------------------------------------------------
    if config.steps is not None:
        total_steps = config.steps
    else:  # the rank with the fewest batches sets the length of an epoch
        per_epoch = min(len(pack_batches(train_src.lengths[epoch_order(
            len(train_src), config.seed, 0, r, world, blocks=train_src.blocks, window_blocks=train_src.window_blocks)],
            config.batch_tokens)) for r in range(world))
        total_steps = max(1, int(config.epochs * per_epoch / config.grad_accum))

    # -- model, optimizer, checkpoint ----------------------------------------------------------
    ckpt = latest_checkpoint(config.out) if config.resume else None
    schedule_steps = total_steps  # the LR schedule's horizon; a resumed run keeps the one it started with
    if ckpt is not None:
        schedule_steps = _check_resume_state(read_state(ckpt), data_state, training, total_steps, ckpt)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=config.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, config.warmup_steps, schedule_steps))
    step, cursors = 0, [None] * world
    if ckpt is not None:
        try:
            state = load_checkpoint(ckpt, model, optimizer, scheduler)
        except ValueError as exc:
            raise TrainError(f"{exc}; resume with the student the run started with, or start over with --overwrite") from exc
        step, cursors = state["step"], state["cursors"]
        log(f"resumed from {ckpt} at step {step}" + (f"; steps {schedule_steps + 1}-{total_steps} run at the final "
            "learning rate (the schedule keeps the run's first horizon)" if total_steps > schedule_steps else ""))
    ddp = _ddp(model, device) if world > 1 else model
    batcher = Batcher(train_src, batch_tokens=config.batch_tokens, seed=config.seed, rank=rank, world_size=world,
                      cursor=cursors[rank])

    # -- outputs -------------------------------------------------------------------------------
    run_info = {"config": asdict(config), "student": student_name, "teacher_path": teacher_path, "world_size": world,
                "total_steps": total_steps, "schedule_steps": schedule_steps, "num_train_sequences": len(train_src),
                **data_info, "cache_key": data_state["cache_key"]}
    metrics = None
    if rank == 0:
        with open(os.path.join(config.out, "run.json"), "w") as f:
            json.dump({**run_info, "status": "running"}, f, indent=1)
        metrics = MetricsLog(config.out, resume_step=step, tensorboard=config.tensorboard)
    trace = None
    if config.trace_data:
        os.makedirs(os.path.join(config.out, "trace"), exist_ok=True)
        trace = open(os.path.join(config.out, "trace", f"rank-{rank}.jsonl"), "a")  # noqa: SIM115 - closed below
    tick = progress(total_steps, step) if (progress and rank == 0) else (lambda **kw: None)

    # -- the loop ------------------------------------------------------------------------------
    started = time.time()
    train_seconds, tokens_seen, last = 0.0, 0, {}
    try:
        if metrics and step == 0 and config.eval_every and eval_batches:
            metrics.write({"step": 0, **evaluate_heldout(model, eval_batches, config, eval_src.has_teacher, num_ids)})
        while step < total_steps:
            t0 = time.time()
            loss_sum = ce_sum = kd_sum = 0.0
            step_tokens = 0
            for micro in range(config.grad_accum):
                batch = next(batcher)
                if trace:
                    trace.write(json.dumps({"step": step + 1, "ids": batch["ids"]}) + "\n")
                batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                last_micro = micro == config.grad_accum - 1
                with ddp.no_sync() if (world > 1 and not last_micro) else contextlib.nullcontext():
                    loss, stats = _loss(ddp, batch, config, num_ids)
                    (loss / config.grad_accum).backward()
                loss_sum += float(loss.detach()) / config.grad_accum
                ce_sum += float(stats["ce"]) / config.grad_accum
                kd_sum += float(stats["kd"]) / config.grad_accum
                step_tokens += batch["num_tokens"]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.clip)) if config.clip > 0 else float("nan")
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses; scheduler.step() sets the next one
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.time() - t0
            train_seconds += seconds
            tokens_seen += step_tokens * world
            tps = step_tokens * world / max(seconds, 1e-9)
            last = {"step": step, "loss": loss_sum, "ce": ce_sum, "kd": kd_sum, "lr": lr,
                    "grad_norm": grad_norm, "tokens_per_s": tps, "tokens": tokens_seen, "epoch": batcher.cursor["epoch"]}
            if metrics and (step % config.log_every == 0 or step == total_steps):
                metrics.write(last)
            tick(step=step, loss=loss_sum, tps=tps)
            if metrics and eval_batches and ((config.eval_every and step % config.eval_every == 0) or step == total_steps):
                evaluation = evaluate_heldout(model, eval_batches, config, eval_src.has_teacher, num_ids)
                if evaluation:
                    metrics.write({"step": step, **evaluation})
                    last.update(evaluation)
            stopping = config.stop_after is not None and step >= config.stop_after and step < total_steps
            if (config.save_every and step % config.save_every == 0) or stopping:
                all_cursors = [batcher.cursor]
                if world > 1:
                    all_cursors = [None] * world
                    torch.distributed.all_gather_object(all_cursors, batcher.cursor)
                if rank == 0:
                    save_checkpoint(config.out, step, model, optimizer, scheduler,
                                    {"cursors": all_cursors, "data": data_state, "train": training,
                                     "schedule_steps": schedule_steps})
                if world > 1:
                    torch.distributed.barrier()
            if stopping:
                log(f"stopped after step {step} (--stop-after); rerun with --resume to continue")
                return {"status": "stopped", "step": step}
    finally:
        batcher.close()
        if metrics:
            metrics.close()
        if trace:
            trace.close()

    # -- save ----------------------------------------------------------------------------------
    summary = {"status": "complete", "steps": step, "seconds": round(time.time() - started, 2),
               "tokens_per_s": round(tokens_seen / max(train_seconds, 1e-9), 1), "final": last,
               "num_parameters": sum(p.numel() for p in model.parameters())}
    if rank == 0:
        from trainer.student import save_student

        save_student(model, tokenizer, config.out)
        with open(os.path.join(config.out, "run.json"), "w") as f:
            json.dump({**run_info, **summary}, f, indent=1)
    if world > 1:
        torch.distributed.barrier()
    return {**summary, "student": student_name, "out": config.out}
