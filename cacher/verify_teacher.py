"""`kdcache verify --against-teacher`: recompute randomly chosen rows of a cache with its teacher and compare.

`kdcache verify` proves a cache well-formed and internally consistent; it cannot tell rows of another model,
relabelled, from the teacher's (storage_layout.md 8.1). This check can: it picks N rows at random (seeded; the
seed and the rows are reported), runs the teacher (the manifest's `teacher.path`, or --model) in the dtype the
cache records over the sequences holding them, and compares each chosen row with the teacher's log-probabilities
over all its logit rows:
  - every stored top-K entry: the teacher's log-probability of that id (an id the teacher never ranks equally
    high, or a log-probability off by more than the tolerance, fails the row);
  - the top K are the K most likely ids below V: no other id below V is more likely than the least likely stored
    one (beyond the tolerance: near-ties may swap);
  - target_logprob: the teacher's log-probability of the next token; tail_logprob: 1 - the top-K probabilities.
Tail samples are random draws and are not recomputed (their rules are checked by `kdcache verify`).

Tolerance on a log-probability l: `2^-7 |l| + ABSOLUTE[engine, dtype]` (float16 rounding, plus what a
recomputation may differ by: batch composition, kernels, and, for a vLLM-built cache recomputed with
transformers, another implementation); on a probability (the tail): 1e-3 + the same absolute term. A stored
top-K entry is a sqrt-probability code (section 3.1), so it is compared on that scale: with s the top-K mass of the
stored tail and L the levels, |sqrt(q / s) - sqrt(p / s)| may be a step 1 / L (half a step of rounding, a whole one
below the smallest level), plus the float16 value's rounding and the same log-probability tolerance, halved (a
relative error e in p is e / 2 in sqrt(p)).

Uses the hf engine's model loading (cacher.engine_hf) and the cache reader; writes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shared.errors import UserError
from shared.reader import CacheReader

# What a recomputed log-probability may differ by beyond storage rounding, by (engine that built the cache,
# dtype): float32 recomputations differ in summation order only; 16-bit teachers round every logit to 8 or 11
# significant bits, so a batch of other shape can move a log-probability by a few of those steps.
ABSOLUTE = {("hf", "float32"): 2e-3, ("hf", "float16"): 0.05, ("hf", "bfloat16"): 0.15,
            ("vllm", "float32"): 1e-2, ("vllm", "float16"): 0.1, ("vllm", "bfloat16"): 0.25}
RELATIVE = 2.0**-7


class TeacherCheckError(UserError):
    """The teacher check cannot run as asked (no teacher folder here, an empty cache, a bad --rows)."""


@dataclass
class RowFinding:
    shard: str
    row: int
    sequence: int
    problem: str

    def __str__(self) -> str:
        return f"{self.shard}: row {self.row} (sequence {self.sequence}): {self.problem}"


@dataclass
class TeacherReport:
    model: str
    engine: str
    dtype: str
    seed: int
    rows: list[tuple[str, int]]  # (shard, row) checked
    findings: list[RowFinding] = field(default_factory=list)
    worst: float = 0.0  # the largest |stored - teacher| log-probability seen (over stored top-K entries)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


def choose_rows(reader: CacheReader, num_rows: int, seed: int) -> list[tuple[int, int]]:
    """num_rows distinct (shard index, row) drawn uniformly from every row of the cache, in storage order."""
    counts = np.array([s.num_tokens for s in reader.shards], dtype=np.int64)
    total = int(counts.sum())
    if num_rows < 1:
        raise TeacherCheckError(f"{{rows}} must be >= 1, got {num_rows}")
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(num_rows, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    shards = np.searchsorted(starts, picks, side="right") - 1
    return [(int(s), int(p - starts[s])) for s, p in zip(shards, picks, strict=True)]


def teacher_folder(reader: CacheReader, model: str | None) -> str:
    """--model, else the manifest's teacher.path, as a local model folder."""
    from common.models import model_folder

    name = model or reader.manifest.teacher.get("path")
    if not name:
        raise TeacherCheckError("the cache records no teacher.path; pass {model} (the teacher's folder)")
    try:
        return str(model_folder(name))
    except (FileNotFoundError, OSError) as exc:
        raise TeacherCheckError(f"teacher {name!r} is not on this machine ({exc}); pass {{model}} (the teacher's "
                                "folder)") from exc


def check_against_teacher(url: str, *, num_rows: int, seed: int = 0, model: str | None = None,
                          log: Callable[[str], None] = print) -> TeacherReport:
    """Recompute num_rows rows of the cache at url with its teacher; a report of the rows that disagree."""
    from cacher.engine_hf import load_hf_teacher
    from common.models import weights_sha256

    reader = CacheReader(url, verify_on_read=True)
    manifest = reader.manifest
    engine, dtype = manifest.teacher.get("engine", "hf"), manifest.teacher.get("dtype", "float32")
    if (engine, dtype) not in ABSOLUTE:
        raise TeacherCheckError(f"no tolerance is documented for caches of engine {engine!r} in {dtype!r}; "
                                f"known: {sorted(ABSOLUTE)}")
    folder = teacher_folder(reader, model)
    report = TeacherReport(model=folder, engine=engine, dtype=dtype, seed=seed, rows=[])
    recorded = manifest.teacher.get("weights_sha256")
    if recorded and weights_sha256(folder) != recorded:
        report.notes.append(f"the weights of {folder} are not those the cache records (teacher.weights_sha256 "
                            f"{recorded[:12]}...): the rows are compared with this model anyway")
    picks = choose_rows(reader, num_rows, seed)
    log(f"recomputing {len(picks)} row(s) (seed {seed}) with {folder} ({engine} cache, {dtype})")
    teacher = load_hf_teacher(folder, dtype=dtype)  # one of ABSOLUTE's dtypes, checked above
    by_sequence: dict[tuple[int, int], list[int]] = {}
    for shard, row in picks:
        offsets = reader.shard(shard).offsets
        sequence = int(np.searchsorted(offsets, row, side="right")) - 1
        by_sequence.setdefault((shard, sequence), []).append(row)
    for (shard, sequence), rows in sorted(by_sequence.items()):
        view = reader.shard(shard)
        start, stop = int(view.offsets[sequence]), int(view.offsets[sequence + 1])
        stored = view.read_rows(start, stop)
        logp = _teacher_logprobs(teacher, stored["input_ids"])  # (T, W) float64
        for row in rows:
            report.rows.append((reader.shards[shard].name, row))
            problem, worst = compare_row(stored, logp, row - start, manifest.vocab_size, ABSOLUTE[engine, dtype],
                                         manifest.arrays["topk_prob_steps"]["levels"])
            report.worst = max(report.worst, worst)
            if problem:
                report.findings.append(RowFinding(reader.shards[shard].name, row, sequence, problem))
    return report


def _teacher_logprobs(teacher, input_ids: np.ndarray) -> np.ndarray:
    """(T, W) float64 log-probabilities of the teacher over all its logit rows, row t for the token after t."""
    import torch

    with torch.no_grad():
        ids = torch.as_tensor(input_ids.astype(np.int64), device=teacher.device)[None]
        logits = teacher.model(input_ids=ids).logits[0].double()
        return torch.log_softmax(logits, dim=-1).cpu().numpy()


def compare_row(stored: dict[str, np.ndarray], logp: np.ndarray, t: int, vocab_size: int,
                absolute: float, levels: int) -> tuple[str | None, float]:
    """(what disagrees in row t, or None; the largest |stored - teacher| over the row's top-K entries).

    stored: a sequence's rows as the reader returns them; logp: the teacher's (T, W) log-probabilities for it;
    levels: L of the cache's sqrt-probability steps (manifest.arrays.topk_prob_steps.levels).
    """
    ids = stored["topk_ids"][t].astype(np.int64)
    values = stored["topk_logprobs"][t].astype(np.float64)
    truth = logp[t]
    differ = np.abs(np.where(np.isneginf(values) & np.isneginf(truth[ids]), 0.0, values - truth[ids]))
    worst = float(np.max(np.where(np.isfinite(differ), differ, np.inf))) if len(differ) else 0.0
    log_mass = math.log(-math.expm1(min(float(stored["tail_logprob"][t]), -1e-30)))  # ln s of the stored tail
    stored_root, true_root = np.exp((values - log_mass) / 2), np.exp((truth[ids] - log_mass) / 2)  # sqrt(q / s), sqrt(p / s)
    tolerance = (1 / levels + stored_root * np.abs(np.where(np.isfinite(values), values, 0)) * 2.0**-12
                 + np.maximum(stored_root, true_root) * (RELATIVE * np.abs(truth[ids]) + absolute) / 2)
    bad = np.flatnonzero(~(np.abs(stored_root - true_root) <= tolerance))
    if len(bad):
        k = int(bad[0])
        return (f"top-K entry {k}, id {int(ids[k])}: stored log-probability {values[k]:.4f}, the teacher's "
                f"{truth[ids[k]]:.4f} (sqrt(p / s) {stored_root[k]:.5f} against {true_root[k]:.5f}, tolerance "
                f"{tolerance[k]:.5f})"), worst
    below = truth[:vocab_size].copy()
    below[ids] = -math.inf
    best_other = int(np.argmax(below))
    least = float(truth[ids].min())
    if below[best_other] > least + RELATIVE * abs(least) + absolute:
        return (f"id {best_other} is more likely to the teacher ({below[best_other]:.4f}) than the least likely of "
                f"the stored top K ({least:.4f}): these are not the teacher's top K"), worst
    if t + 1 < len(stored["input_ids"]):
        target, want = float(stored["target_logprob"][t]), float(truth[int(stored["input_ids"][t + 1])])
        if not abs(target - want) <= RELATIVE * abs(want) + absolute:
            return f"target_logprob {target:.4f}, the teacher's {want:.4f}", worst
    rest = max(0.0, 1.0 - float(np.exp(truth[ids]).sum()))
    tail = math.exp(float(stored["tail_logprob"][t]))
    if not abs(tail - rest) <= 1e-3 + absolute:
        return f"tail probability {tail:.5f}, the teacher's rest outside the stored top K {rest:.5f}", worst
    return None, worst
