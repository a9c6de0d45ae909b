"""P6: held-out perplexity after the same steps: CE only, dense online KD, top-K cached KD, RS-KD.

Target: top-K cached KD at K=64 keeps >= 0.95 of the dense-KD gain over CE,
    kept(K) = (CE_ce - CE_K) / (CE_ce - CE_dense)
in held-out cross-entropy (nats per token; the perplexity ratio in log space), and also reported
in perplexity. Every variant starts from the same student (trainer.student.student_from_teacher, a
layer-dropped copy of a teacher that is really better), sees the same batches in the same order
(trainer.data.epoch_order / pack_batches / collate over real text, the trainer's held-out rule), and
takes the same AdamW steps with the trainer's learning-rate schedule (warm-up, then cosine to 10%):

- ce: trainer.losses.cross_entropy_loss on the real next token;
- dense: the teacher runs on every batch, trainer.losses.dense_kd_loss (fkl, alpha 0);
- topk-K: the teacher's top-K as a cache stores them (cacher.engine_hf.score_hf -> shared.writer's
  validation: float16, ranks > 16 trimmed, tail and target_logprob stored), trainer.losses.sparse_kd_loss
  (fkl, alpha 0) as `kdtrain run` calls it: K + 2 buckets (the real next token has its own bucket when it
  is outside the top K);
- topk-K-notarget: the same with K + 1 buckets (`kdtrain run --no-target-bucket`);
- tail-K+M: the top K plus M ids drawn from the teacher's distribution outside them, with counts
  (`kdcache build --top-k K --tail-samples M`: cacher.engine_hf.score_hf with tail_samples, the writer's
  validation), trained as `kdtrain run` does: trainer.losses.tail_sample_targets, then sparse_kd_loss
  (fkl) over the K + M ids with an empty rest bucket. K + M = 64 stores as many entries as top-64;
- rs-N (random-sampled KD, "Sparse Logit Sampling", Anshumann et al. 2025): N ids drawn from the
  teacher's distribution per row, stored as the distinct ids with their counts. The empirical
  distribution count/N is an unbiased estimate of the teacher's, so the cross-entropy against it has
  the dense KD's expected gradient. It is fed to sparse_kd_loss as log(count/N) with an empty tail
  (-inf) and unused slots at -inf: KL(count/N || student over the sampled ids + rest) differs from
  -sum count/N * log q(id) by a constant, so its gradient is exactly RS-KD's.

- candidates (--candidates, at --cand-k): bench/tail_losses.py's losses that give the rest bucket an
  inner distribution (a prior, the real next token, finer groups); see CANDIDATES below and
  docs/p6-notes.md for what each would need a cache to store and what they kept.

Every KD variant (dense included) uses the same --alpha (CE weight; default 0, the trainer's default),
temperature 1 and the same learning rate and schedule. Past one epoch of the training sequences the
next epoch's order follows, as the trainer's Batcher does.

Evaluation: trainer.run_loss.evaluate_heldout (exp of the mean CE of the real next tokens) on the held-out
sequences. Repeats are data-order seeds; medians are reported. --eval-kl adds each variant's held-out
dense KL(teacher || student) and its within-tail part at K=64 (the term a top-K cache never shows).
--only trains a subset (the figures are deterministic, so runs split by seed or variant combine).

  python -m bench.p6_quality --quick     # tiny Shakespeare teacher (examples/make_tiny_teacher.py), CPU
  python -m bench.p6_quality             # SmolLM2-135M teacher, 6-layer student, pydoc topics (a GPU)
  python -m bench.p6_quality --quick --seeds 0,1,2 --ks 64 --rs "" --tail 48+16 \
      --candidates fill:bigram,fill:teacher,tailce,groups16 --eval-kl      # the tail-shape candidates
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/p6_quality.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import bench_home, device, emit, median, model_path, num_parameters, raw_rows, tiny_teacher

SHAKESPEARE = str(Path(__file__).resolve().parents[1] / "data" / "shakespeare.txt")  # data/README.md
# The quick size's student: a random 2-layer, 64-wide GPT-2 on the tiny teacher's vocabulary (the tiny
# teacher is 4 x 128 and trained; a layer-dropped copy of it starts almost as good as it and beats it
# with plain CE within the quick budget, so it could not show what distillation adds).
QUICK_STUDENT_CONFIG = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 512}
QUICK_STUDENT = "quick-student.json"


# ---------------------------------------------------------------------------------------------
# RS-KD: sampled sparse targets


@torch.no_grad()
def rs_sample(logits: torch.Tensor, num_samples: int, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw num_samples ids per row from softmax(logits); the distinct ids with their counts.

    logits: (R, V) float. Returns ids (R, num_samples) int64 and counts (R, num_samples) uint8/16, most
    frequent first; slots past a row's distinct ids have count 0 (their ids are distinct unused ids).
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (R, V)
    draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator)  # (R, N)
    counts = torch.zeros_like(probs).scatter_add_(1, draws, torch.ones_like(draws, dtype=probs.dtype))  # (R, V)
    top_counts, ids = torch.topk(counts, num_samples, dim=-1)  # (R, N) distinct ids, most drawn first
    dtype = np.uint8 if num_samples < 256 else np.uint16
    return ids.cpu().numpy(), top_counts.cpu().numpy().astype(dtype)


def rs_logprobs(counts: np.ndarray) -> np.ndarray:
    """log(count / N) per slot, -inf for unused slots: the sparse target sparse_kd_loss takes."""
    num_samples = counts.sum(1, keepdims=True).astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.log(counts / num_samples).astype(np.float32)


@torch.no_grad()
def teacher_samples(model, seqs: list[np.ndarray], num_samples: int, seed: int, batch_tokens: int = 4096):
    """RS-KD rows for every sequence: (T, N) ids and counts per sequence, one teacher forward per batch."""
    from cacher.engine_hf import length_sorted_batches

    gen = torch.Generator().manual_seed(seed)
    lengths = [len(s) for s in seqs]
    out: list = [None] * len(seqs)
    for batch in length_sorted_batches(lengths, batch_tokens):
        width = max(lengths[i] for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, i in enumerate(batch):
            ids[r, : lengths[i]] = torch.as_tensor(seqs[i])
            attn[r, : lengths[i]] = 1
        logits = model(input_ids=ids.to(device()), attention_mask=attn.to(device())).logits  # (B, L, V)
        rs_ids, counts = rs_sample(logits[attn.bool().to(logits.device)].cpu(), num_samples, gen)  # (R, N) real rows
        pos = 0
        for i in batch:
            out[i] = (rs_ids[pos:pos + lengths[i]], counts[pos:pos + lengths[i]])
            pos += lengths[i]
    return out


# ---------------------------------------------------------------------------------------------
# Training


def heldout_split(sequences, eval_fraction: float):
    from trainer.data import heldout_hash, heldout_mask

    hashes = np.asarray([heldout_hash(s.text_sha256, s.window_index, s.source_index) for s in sequences], dtype=np.int64)
    return heldout_mask(hashes, eval_fraction)


def make_student(path: str, student: str, vocab_size: int):
    """"drop:N" = the teacher keeping N layers (student_from_teacher); else a JSON config (student_from_config)."""
    from trainer.student import student_from_config, student_from_teacher

    if student.startswith("drop:"):
        return student_from_teacher(path, int(student.split(":")[1]))
    return student_from_config(student, vocab_size)


# Candidate losses (bench/tail_losses.py) at --cand-k: what fills the rest bucket's inner distribution.
#   fill:teacher   the teacher's mean distribution over the training rows, one (V,) vector per cache
#   fill:cache     the same estimated from the cached top-K entries alone (no extra storage)
#   fill:data      the training data's token frequencies (no extra storage)
#   fill:uniform   a uniform tail (a control)
#   fill:bigram    the teacher's mean distribution given the current input token, a (V, V) table
#   fill:bigram-cache  the same estimated from the cached top-K entries alone (no extra storage)
#   tailce         K + 1 buckets and -log q(y | rest) on rows whose real next token y is in the rest
#   groupsC        C fixed groups of the vocabulary (k-means on the teacher's head): K + C (+1) buckets,
#                  the cache storing C group masses per row; groupsC+fill:teacher also fills inside them
#   oracle         the teacher's own per-row distribution as the fill (dense KD through the decomposition)
CANDIDATES = ("fill:teacher", "fill:cache", "fill:data", "fill:uniform", "fill:bigram", "fill:bigram-cache", "tailce",
              "oracle")


def candidate_parts(name: str) -> tuple[int, str | None, bool]:
    """(number of groups (1 = one rest bucket), prior name or None, tail CE) of a candidate name."""
    groups, prior, tailce = 1, None, False
    for part in name.split("+"):
        if part.startswith("groups"):
            groups = int(part[len("groups"):])
        elif part.startswith("fill:") and part in CANDIDATES:
            prior = part[len("fill:"):]
        elif part == "tailce":
            tailce = True
        elif part == "oracle":
            prior = "oracle"
        else:
            raise ValueError(f"unknown candidate part {part!r} in {name!r}; known: {', '.join(CANDIDATES)}, groupsC")
    return groups, prior, tailce


def train_variant(path: str, student_spec: str, batches: list[dict], variant: str, teacher, *, lr: float,
                  warmup: int, eval_batches: list, alpha: float = 0.0, priors: dict | None = None,
                  vocab_groups: dict | None = None, eval_teacher: list | None = None) -> dict:
    """Train a fresh student on `batches` with one variant's loss; held-out metrics after."""
    from bench.tail_losses import tail_fill_kd_loss
    from trainer.losses import (
        LossOptions,
        cross_entropy_loss,
        dense_kd_loss,
        sparse_kd_loss,
        tail_sample_targets,
    )
    from trainer.run_loss import evaluate_heldout
    from trainer.run_setup import lr_schedule

    torch.manual_seed(0)
    student = make_student(path, student_spec, teacher.config.vocab_size).to(device()).train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))
    total = len(batches)  # the schedule `kdtrain run` uses: linear warm-up, then cosine down to 10% of lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_schedule(s, warmup, total))
    candidate = variant.split("@")[0] if "@" in variant else None
    started = time.perf_counter()
    grad_norms, losses = [], []
    for batch in batches:
        batch = {k: (v.to(device()) if torch.is_tensor(v) else v) for k, v in batch.items()}
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
        vocab = logits.shape[-1]
        flat_logits = logits.reshape(-1, vocab)  # (B*L, V)
        targets, mask = batch["target_ids"].reshape(-1), batch["loss_mask"].reshape(-1)
        if variant == "ce":
            loss = cross_entropy_loss(flat_logits, targets, mask)
        elif variant == "dense":
            with torch.no_grad():
                t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, _ = dense_kd_loss(flat_logits, t_logits.reshape(-1, t_logits.shape[-1])[:, :vocab], targets, mask,
                                    LossOptions(alpha=alpha))
        elif candidate is not None:
            k = batch["topk_ids"].shape[-1]
            num_groups, prior_name, tailce = candidate_parts(candidate)
            prior = None
            if prior_name == "oracle":
                with torch.no_grad():
                    t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                prior = torch.softmax(t_logits.reshape(-1, t_logits.shape[-1])[:, :vocab].double(), -1)  # (N, V)
            elif prior_name in ("bigram", "bigram-cache"):
                prior = priors[prior_name][batch["input_ids"].reshape(-1)]  # (N, V) by the current input token
            elif prior_name is not None:
                prior = priors[prior_name]  # (V,)
            grouping = {}
            if num_groups > 1:
                grouping = {"groups": vocab_groups[num_groups],
                            "group_logprobs": batch[f"group_logprobs_{num_groups}"].reshape(-1, num_groups)}
            loss, _ = tail_fill_kd_loss(
                flat_logits, batch["topk_ids"].reshape(-1, k), batch["topk_logprobs"].reshape(-1, k),
                batch["tail_logprob"].reshape(-1), targets, mask, alpha=alpha, prior=prior,
                target_logprob=None if tailce else batch["target_logprob"].reshape(-1), tail_target_fill=tailce,
                **grouping)
        else:
            k = batch["topk_ids"].shape[-1]
            target_lp = batch["target_logprob"].reshape(-1) if variant.startswith("topk-") and not variant.endswith(
                "-notarget") else None
            ids, top_lp, tail = batch["topk_ids"].reshape(-1, k), batch["topk_logprobs"].reshape(-1, k), \
                batch["tail_logprob"].reshape(-1)
            if variant.startswith("tail-"):  # as trainer.run_loss.sparse_loss does with a tail-sampled cache
                m = batch["tail_ids"].shape[-1]
                ids, top_lp, tail = tail_sample_targets(ids, top_lp, tail, batch["tail_ids"].reshape(-1, m),
                                                        batch["tail_counts"].reshape(-1, m))
            loss, _ = sparse_kd_loss(flat_logits, ids, top_lp, tail, targets, mask, LossOptions(alpha=alpha),
                                     target_logprob=target_lp)
        loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))  # before clipping
        losses.append(float(loss.detach()))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    result = evaluate_heldout(student, eval_batches, None, has_teacher=False)
    out = {"eval_ppl": result["eval_ppl"], "eval_ce": math.log(result["eval_ppl"]), "train_s": seconds,
           "grad_norm_median": median(grad_norms), "clipped_fraction": float(np.mean(np.asarray(grad_norms) > 1.0)),
           "loss_first_last": [losses[0], losses[-1]]}
    if eval_teacher is not None:
        out.update(heldout_kl(student, eval_batches, eval_teacher))
    return out


@torch.no_grad()
def heldout_kl(student, eval_batches: list, eval_teacher: list, top_k: int = 64) -> dict:
    """Held-out dense KL(teacher || student) per token and its split at the teacher's top-K (K + 1 buckets):

    dense = buckets + tail, tail = P_rest * KL(p(. | rest) || q(. | rest)): the part a top-K cache never shows.
    eval_teacher: per eval batch, the teacher's (M, V) log-probs on its loss rows.
    """
    from trainer.divergences import divergence

    student.eval()
    dense = tail = count = 0.0
    for batch, t_lp in zip(eval_batches, eval_teacher):
        mask = batch.loss_mask
        logits = student(input_ids=batch.input_ids.to(device()), attention_mask=batch.attention_mask.to(device()))
        q = torch.log_softmax(logits.logits.float()[mask.to(device())].double().cpu(), -1)  # (M, V)
        p = t_lp.double()
        dense += float(divergence(p, q, "fkl").sum())
        k = min(top_k, p.shape[1])
        ids = p.topk(k, -1).indices
        rest_p = p.scatter(1, ids, -math.inf)
        rest_q = q.scatter(1, ids, -math.inf)
        p_rest = torch.logsumexp(rest_p, -1, keepdim=True)
        cond_p, cond_q = rest_p - p_rest, rest_q - torch.logsumexp(rest_q, -1, keepdim=True)
        tail += float((p_rest[:, 0].exp() * divergence(cond_p, cond_q, "fkl")).sum())
        count += p.shape[0]
    student.train()
    return {"eval_dense_kl": dense / count, "eval_tail_kl": tail / count}


def variant_rows(variant: str, seqs, stored_by_k: dict, rs_by_n: dict, stored_tail: dict | None = None) -> list[dict]:
    """Per-sequence dicts for trainer.data.collate: the teacher fields this variant trains on."""
    rows = []
    for i, ids in enumerate(seqs):
        row = {"input_ids": ids, "loss_mask": np.r_[np.ones(len(ids) - 1, bool), [False]]}
        if variant.startswith("tail-"):
            stored = stored_tail[variant[len("tail-"):]]
            a, b = stored["offsets"][i], stored["offsets"][i + 1]
            row.update({k: stored[k][a:b] for k in ("topk_ids", "topk_logprobs", "tail_logprob", "tail_ids",
                                                     "tail_counts")})
        elif variant.startswith("topk-") or "@" in variant:
            stored = stored_by_k[int(variant.split("@")[1] if "@" in variant else variant.split("-")[1])]
            a, b = stored["offsets"][i], stored["offsets"][i + 1]
            row.update(topk_ids=stored["topk_ids"][a:b], topk_logprobs=stored["topk_logprobs"][a:b],
                       tail_logprob=stored["tail_logprob"][a:b])
            if not variant.endswith("-notarget"):
                row["target_logprob"] = stored["target_logprob"][a:b]
            for name in stored:
                if name.startswith("group_logprobs_"):
                    row[name] = stored[name][a:b]
        elif variant.startswith("rs-"):
            rs_ids, counts = rs_by_n[int(variant.split("-")[1])][i]
            row.update(topk_ids=rs_ids, topk_logprobs=rs_logprobs(counts),
                       tail_logprob=np.full(len(ids), -np.inf, dtype=np.float32))
        rows.append(row)
    return rows


def collate_rows(rows: list[dict], has_teacher: bool) -> dict:
    """trainer.batch.collate as the dict of tensors this bench's loop reads (teacher fields widened as the trainer
    reads them), plus the candidates' per-row group masses (B, L, C), right-padded with -inf."""
    from dataclasses import fields

    from trainer.batch import collate

    collated = collate(rows, has_teacher).to("cpu")
    batch = {"input_ids": collated.input_ids, "attention_mask": collated.attention_mask,
             "target_ids": collated.target_ids, "loss_mask": collated.loss_mask, "num_tokens": collated.num_tokens}
    if collated.teacher is not None:
        batch.update({f.name: getattr(collated.teacher, f.name) for f in fields(collated.teacher)
                      if getattr(collated.teacher, f.name) is not None})
    width = batch["input_ids"].shape[1]
    for name in [n for n in rows[0] if n.startswith("group_logprobs_")]:
        out = torch.full((len(rows), width, rows[0][name].shape[1]), -math.inf, dtype=torch.float32)
        for r, row in enumerate(rows):
            out[r, : len(row[name])] = torch.as_tensor(row[name].astype(np.float32))
        batch[name] = out
    return batch


@torch.no_grad()
def teacher_statistics(model, seqs: list[np.ndarray], topk_ids: np.ndarray, offsets: np.ndarray,
                       groups: dict[int, torch.Tensor], batch_tokens: int = 4096) -> dict:
    """One teacher pass over the training sequences, for the candidates' fills.

    Returns "teacher" (V,) the mean teacher distribution over the loss rows (what a cacher would add up
    while it builds), "bigram" (V, V) the mean distribution given the current input token (rows of unseen
    tokens: the unigram), and per group count C "group_logprobs_C" (rows, C) float16: the teacher's
    log-mass of each group outside the row's top-K ids (topk_ids (rows, K) with the sequences' offsets).
    """
    from bench.tail_losses import group_tail_logprobs

    vocab = None
    unigram = bigram = counts = None
    group_out = {c: [] for c in groups}
    per_batch = max(1, batch_tokens // max(len(s) for s in seqs))
    for start in range(0, len(seqs), per_batch):
        chunk = list(range(start, min(len(seqs), start + per_batch)))
        width = max(len(seqs[i]) for i in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, i in enumerate(chunk):
            ids[r, : len(seqs[i])] = torch.as_tensor(seqs[i])
            attn[r, : len(seqs[i])] = 1
        logits = model(input_ids=ids.to(device()), attention_mask=attn.to(device())).logits.float().cpu()
        if vocab is None:
            vocab = logits.shape[-1]
            unigram = torch.zeros(vocab, dtype=torch.float64)
            bigram = torch.zeros(vocab, vocab, dtype=torch.float64)
            counts = torch.zeros(vocab, dtype=torch.float64)
        lp = torch.log_softmax(logits[attn.bool()].double(), -1)  # (R, V) every row of the chunk, in order
        loss_rows = torch.cat([torch.arange(len(seqs[i])) < len(seqs[i]) - 1 for i in chunk])  # (R,) not last
        probs = lp[loss_rows].exp()
        inputs = ids[attn.bool()][loss_rows]
        unigram += probs.sum(0)
        bigram.index_add_(0, inputs, probs)
        counts += torch.bincount(inputs, minlength=vocab).double()
        rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in chunk])
        top = torch.as_tensor(topk_ids[rows.numpy()].astype(np.int64))
        for c, g in groups.items():
            group_out[c].append(group_tail_logprobs(lp, top, g, c).float().numpy().astype(np.float16))
    unigram /= unigram.sum()
    bigram = torch.where(counts[:, None] > 0, bigram / counts.clamp_min(1)[:, None], unigram)
    out = {"teacher": unigram, "bigram": bigram}
    for c in groups:
        out[f"group_logprobs_{c}"] = np.concatenate(group_out[c])
    return out


QUICK = {"model": "tiny", "dataset": SHAKESPEARE, "student": QUICK_STUDENT, "steps": 80, "batch_tokens": 2048,
         "max_length": 128, "lr": 2e-3, "warmup": 5, "eval_sequences": 64}
FULL = {"model": "smollm2-135m", "dataset": "builtin:pydoc-topics", "student": "drop:6", "steps": 300,
        "batch_tokens": 8192, "max_length": 256, "lr": 3e-4, "warmup": 20, "eval_sequences": 128}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="teacher; 'tiny' = the trained tiny Shakespeare GPT-2 (default smollm2-135m)")
    ap.add_argument("--dataset", help="default builtin:pydoc-topics (--quick: tiny Shakespeare)")
    ap.add_argument("--student", help="drop:N = the teacher keeping N layers; else a JSON config file (random init); "
                    "default drop:6 (--quick: a random 2-layer, 64-wide GPT-2)")
    ap.add_argument("--ks", default="8,32,64,256")
    ap.add_argument("--notarget-ks", default="64", help="K values also trained with K + 1 buckets (no target bucket)")
    ap.add_argument("--rs", default="16,64", help="RS-KD sample counts (empty: none)")
    ap.add_argument("--tail", default="48+16,56+8,64+16",
                    help="K+M: top-K plus M tail samples (kdcache build --top-k K --tail-samples M); empty: none")
    ap.add_argument("--candidates", default="",
                    help="candidate losses at --cand-k (bench/tail_losses.py), comma-separated: "
                         f"{', '.join(CANDIDATES)}, groupsC, groupsC+fill:NAME; empty: none")
    ap.add_argument("--cand-k", type=int, default=64, help="K of the candidates (must be in --ks)")
    ap.add_argument("--steps", type=int, help="default 300 (--quick: 80); past one epoch the next epoch's order follows")
    ap.add_argument("--batch-tokens", type=int)
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--alpha", type=float, default=0.0,
                    help="CE weight of every KD variant (dense included): alpha * CE + (1 - alpha) * KD")
    ap.add_argument("--seeds", default="0", help="data-order seeds (repeats); medians are reported")
    ap.add_argument("--eval-sequences", type=int)
    ap.add_argument("--eval-kl", action="store_true",
                    help="also report each variant's held-out dense KL to the teacher and its tail part at K=64")
    ap.add_argument("--only", default="",
                    help="train only these variants (comma-separated names as printed, e.g. ce,dense,tailce@64); "
                         "the gain kept needs ce and dense among them")
    ap.add_argument("--threads", type=int, help="torch threads (default: every core)")
    ap.add_argument("--tiny-teacher-steps", type=int, default=150)
    ap.add_argument("--quick", action="store_true",
                    help="tiny teacher, tiny Shakespeare, random 2-layer student, 80 steps x 2048 tokens; "
                         "options given explicitly win")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    from cacher.engine_hf import load_hf_teacher, score_hf
    from common.sequences import load_sequences
    from common.tokenizers import load_tokenizer
    from shared.writer import validate_shard_arrays
    from trainer.batch import collate
    from trainer.data import epoch_order, pack_batches

    # the tiny teacher learns the text it is measured on (a .txt --dataset; else the repository's Shakespeare)
    teacher_text = args.dataset if args.dataset.endswith(".txt") else None
    path = tiny_teacher(args.tiny_teacher_steps, text=teacher_text) if args.model == "tiny" else model_path(args.model)
    if args.student == QUICK_STUDENT:
        import json

        args.student = str(bench_home() / QUICK_STUDENT)
        Path(args.student).parent.mkdir(parents=True, exist_ok=True)
        Path(args.student).write_text(json.dumps(QUICK_STUDENT_CONFIG))
    ks = [int(k) for k in args.ks.split(",") if k]
    rs = [int(n) for n in args.rs.split(",") if n]
    tails = [t for t in args.tail.split(",") if t]
    candidates = [c for c in args.candidates.split(",") if c]
    for c in candidates:
        candidate_parts(c)  # refuses unknown names before any work
    seeds = [int(s) for s in args.seeds.split(",")]
    tokenizer = load_tokenizer(path)
    teacher = load_hf_teacher(path, dtype="float32")
    if args.threads:
        torch.set_num_threads(args.threads)  # after load_hf_teacher, which sets every core
    ks = [k for k in ks if k <= teacher.vocab_size]
    if candidates and args.cand_k not in ks:
        ks.append(min(args.cand_k, teacher.vocab_size))
        args.cand_k = ks[-1]
    notarget_ks = [int(k) for k in args.notarget_ks.split(",") if k and int(k) in ks]
    variants = (["ce", "dense"] + [f"topk-{k}" for k in ks] + [f"topk-{k}-notarget" for k in notarget_ks]
                + [f"rs-{n}" for n in rs] + [f"tail-{t}" for t in tails] + [f"{c}@{args.cand_k}" for c in candidates])
    if args.only:  # before any teacher work
        only = set(args.only.split(","))
        if only - set(variants):
            raise SystemExit(f"--only names variants this run does not define: {sorted(only - set(variants))}; "
                             f"defined: {', '.join(variants)}")
        variants = [v for v in variants if v in only]

    # -- data: the trainer's held-out rule, then enough training sequences for every seed's steps --
    need = args.steps * args.batch_tokens // args.max_length + 1
    sequences, _ = load_sequences(args.dataset, tokenizer, max_length=args.max_length, limit=int(need * 1.3) + 200)
    held = heldout_split(sequences, 0.05)
    eval_seqs = [s.input_ids for s, h in zip(sequences, held) if h][: args.eval_sequences]
    train_seqs = [s.input_ids for s, h in zip(sequences, held) if not h][:need]
    eval_batches = [collate([{"input_ids": s, "loss_mask": np.ones(len(s), bool)} for s in eval_seqs[a:b]], False)
                    for a, b in pack_batches(np.asarray([len(s) for s in eval_seqs]), args.batch_tokens)]

    # -- the teacher, once: top-max(K) through the writer's validation per K, RS samples per N --
    started = time.perf_counter()
    results = score_hf(teacher, train_seqs, top_k=max(ks), batch_tokens=args.batch_tokens)
    stored_by_k = {}
    for k in ks:
        raw = raw_rows(train_seqs, results, k)
        stored_by_k[k] = {**validate_shard_arrays(raw, vocab_size=teacher.vocab_size, top_k=k, where="bench"),
                          "mass": np.exp(raw["topk_logprobs"].astype(np.float64)).sum(1).mean()}
    del results
    rs_by_n = {n: teacher_samples(teacher.model, train_seqs, n, seed=n) for n in rs}
    stored_tail = {}
    for spec in tails:
        k, m = (int(x) for x in spec.split("+"))
        tail_results = score_hf(teacher, train_seqs, top_k=k, batch_tokens=args.batch_tokens, tail_samples=m,
                                tail_seed=0, sample_keys=[(i, 0) for i in range(len(train_seqs))])
        raw = raw_rows(train_seqs, tail_results, k)
        raw.update(tail_ids=np.concatenate([r["tail_ids"] for r in tail_results]),
                   tail_counts=np.concatenate([r["tail_counts"] for r in tail_results]))
        stored_tail[spec] = validate_shard_arrays(raw, vocab_size=teacher.vocab_size, top_k=k, where="bench",
                                                  tail_samples=m)
        stored_tail[spec]["mass"] = np.exp(raw["topk_logprobs"].astype(np.float64)).sum(1).mean()
        del tail_results
    priors, groups = {}, {}
    if candidates:  # what each fill is made of, from the training rows only (what a cache holds)
        from bench.tail_losses import cache_bigram, cache_unigram, vocab_groups

        group_counts = sorted({candidate_parts(c)[0] for c in candidates} - {1})
        groups = {c: vocab_groups(teacher.model.get_output_embeddings().weight.detach().cpu(), c)
                  for c in group_counts}
        stored = stored_by_k[args.cand_k]
        stats = teacher_statistics(teacher.model, train_seqs, stored["topk_ids"], stored["offsets"], groups,
                                   batch_tokens=args.batch_tokens)
        for c in group_counts:
            stored[f"group_logprobs_{c}"] = stats[f"group_logprobs_{c}"]
        loss_rows = stored["loss_mask"].astype(bool)
        vocab = teacher.vocab_size
        cached_ids = torch.as_tensor(stored["topk_ids"][loss_rows].astype(np.int64))
        cached_lp = torch.as_tensor(stored["topk_logprobs"][loss_rows].astype(np.float32))
        priors = {"teacher": stats["teacher"], "bigram": stats["bigram"],
                  "cache": cache_unigram(cached_ids, cached_lp, vocab),
                  "bigram-cache": cache_bigram(torch.as_tensor(stored["input_ids"][loss_rows].astype(np.int64)),
                                               cached_ids, cached_lp, vocab),
                  "data": torch.as_tensor(np.bincount(np.concatenate([s[1:] for s in train_seqs]), minlength=vocab)
                                          .astype(np.float64)),
                  "uniform": torch.ones(vocab, dtype=torch.float64)}
        priors = {k: v.to(device()) for k, v in priors.items()}
        groups = {c: g.to(device()) for c, g in groups.items()}
    capture_s = time.perf_counter() - started
    from trainer.run_loss import evaluate_heldout

    teacher_ppl = evaluate_heldout(teacher.model, eval_batches, None, has_teacher=False)["eval_ppl"]
    teacher.model.eval()  # evaluate_heldout leaves a model in train mode (dropout on)
    eval_teacher = None
    if args.eval_kl:
        with torch.no_grad():
            eval_teacher = [torch.log_softmax(teacher.model(input_ids=b.input_ids.to(device()),
                                                            attention_mask=b.attention_mask.to(device()))
                                              .logits.float()[b.loss_mask.to(device())].cpu(), -1)
                            for b in eval_batches]
    torch.manual_seed(0)
    student_params = num_parameters(make_student(path, args.student, teacher.model.config.vocab_size))
    torch.manual_seed(0)
    init_ppl = evaluate_heldout(make_student(path, args.student, teacher.model.config.vocab_size), eval_batches, None,
                                False)["eval_ppl"]

    # -- train every variant on the same batches, per seed --
    lengths = np.asarray([len(s) for s in train_seqs])
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for seed in seeds:
        order, spans, epoch = np.zeros(0, dtype=np.int64), [], 0
        while len(spans) < args.steps:  # epoch after epoch, as the trainer's Batcher goes on
            this = epoch_order(len(train_seqs), seed, epoch)
            more = pack_batches(lengths[this], args.batch_tokens)[: args.steps - len(spans)]
            spans += [(a + len(order), b + len(order)) for a, b in more]
            order = np.concatenate([order, this])
            epoch += 1
        for variant in variants:
            rows = variant_rows(variant, train_seqs, stored_by_k, rs_by_n, stored_tail)
            has_teacher = variant not in ("ce", "dense")
            batches = [collate_rows([rows[i] for i in order[a:b]], has_teacher) for a, b in spans]
            runs[variant].append(train_variant(path, args.student, batches, variant, teacher.model, lr=args.lr,
                                               warmup=args.warmup, eval_batches=eval_batches, alpha=args.alpha,
                                               priors=priors, vocab_groups=groups, eval_teacher=eval_teacher))
            print(f"seed {seed} {variant}: held-out ppl {runs[variant][-1]['eval_ppl']:.3f}", flush=True)

    table = {}
    for variant in variants:
        ce = median([r["eval_ce"] for r in runs[variant]])
        entry = {"eval_ppl": median([r["eval_ppl"] for r in runs[variant]]), "eval_ce": ce,
                 "per_seed_ppl": [r["eval_ppl"] for r in runs[variant]],
                 "grad_norm_median": median([r["grad_norm_median"] for r in runs[variant]]),
                 "clipped_fraction": median([r["clipped_fraction"] for r in runs[variant]])}
        if "ce" in runs and "dense" in runs:
            kept = [(c["eval_ce"] - r["eval_ce"]) / (c["eval_ce"] - d["eval_ce"])
                    for c, d, r in zip(runs["ce"], runs["dense"], runs[variant])]
            kept_ppl = [(c["eval_ppl"] - r["eval_ppl"]) / (c["eval_ppl"] - d["eval_ppl"])
                        for c, d, r in zip(runs["ce"], runs["dense"], runs[variant])]
            entry.update(gain_kept=median(kept), gain_kept_ppl=median(kept_ppl), per_seed_kept=kept)
        if eval_teacher is not None:
            for name in ("eval_dense_kl", "eval_tail_kl"):
                entry[name] = median([r[name] for r in runs[variant]])
        if variant.startswith("topk-") or "@" in variant:
            k = int(variant.split("@")[1]) if "@" in variant else int(variant.split("-")[1])
            entry["mean_topk_mass"] = float(stored_by_k[k]["mass"])
        if variant.startswith("tail-"):
            entry["mean_topk_mass"] = float(stored_tail[variant[len("tail-"):]]["mass"])
        if variant.startswith("rs-"):
            n = int(variant.split("-")[1])
            entry["mean_distinct_ids"] = float(np.mean(np.concatenate([(c > 0).sum(1) for _, c in rs_by_n[n]])))
        table[variant] = entry
    at64 = table.get("topk-64", {}).get("gain_kept")
    at64_tail = max([v.get("gain_kept", -1) for name, v in table.items() if name.startswith("tail-")
                     and sum(int(x) for x in name[len("tail-"):].split("+")) == 64], default=None)
    emit({"id": "P6", "model": args.model if args.model != "tiny" else f"tiny-teacher ({path})",
          "dataset": args.dataset.split("/")[-1], "student": args.student,
          "student_params": student_params, "teacher_params": num_parameters(teacher.model), "steps": len(spans),
          "epochs": epoch, "batch_tokens": args.batch_tokens, "lr": args.lr, "alpha": args.alpha,
          "train_tokens": int(sum(lengths[order[a:b]].sum() for a, b in spans)),
          "eval_tokens": int(sum(b.num_loss_tokens for b in eval_batches)), "seeds": seeds,
          "teacher_eval_ppl": teacher_ppl, "student_init_eval_ppl": init_ppl, "capture_s": capture_s,
          "variants": table, "target": ">= 0.95 of the dense gain at K=64 (64 stored entries per row)",
          "met_top64": bool(at64 is not None and at64 >= 0.95),
          "met_64_entries_with_tail_samples": bool(at64_tail is not None and at64_tail >= 0.95)}, args.json)


if __name__ == "__main__":
    main()
