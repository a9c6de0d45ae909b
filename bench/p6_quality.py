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
- topk-K: the teacher's top-K as a cache stores them (cacher.engines.score_hf -> shared.writer's
  validation: float16, ranks > 16 trimmed, tail and target_logprob stored), trainer.losses.sparse_kd_loss
  (fkl, alpha 0) as `kdtrain run` calls it: K + 2 buckets (the real next token has its own bucket when it
  is outside the top K);
- topk-K-notarget: the same with K + 1 buckets (`kdtrain run --no-target-bucket`);
- tail-K+M: the top K plus M ids drawn from the teacher's distribution outside them, with counts
  (`kdcache build --top-k K --tail-samples M`: cacher.engines.score_hf with tail_samples, the writer's
  validation), trained as `kdtrain run` does: trainer.losses.tail_sample_targets, then sparse_kd_loss
  (fkl) over the K + M ids with an empty rest bucket. K + M = 64 stores as many entries as top-64;
- rs-N (random-sampled KD, "Sparse Logit Sampling", Anshumann et al. 2025): N ids drawn from the
  teacher's distribution per row, stored as the distinct ids with their counts. The empirical
  distribution count/N is an unbiased estimate of the teacher's, so the cross-entropy against it has
  the dense KD's expected gradient. It is fed to sparse_kd_loss as log(count/N) with an empty tail
  (-inf) and unused slots at -inf: KL(count/N || student over the sampled ids + rest) differs from
  -sum count/N * log q(id) by a constant, so its gradient is exactly RS-KD's.

Evaluation: trainer.train.evaluate_heldout (exp of the mean CE of the real next tokens) on the held-out
sequences. Repeats are data-order seeds; medians are reported.

  python -m bench.p6_quality --quick     # tiny Shakespeare teacher (examples/make_tiny_teacher.py), CPU
  python -m bench.p6_quality             # SmolLM2-135M teacher, 6-layer student, pydoc topics (a GPU)
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from bench.common import bench_home, device, emit, median, model_path, num_parameters, raw_rows, tiny_teacher

SHAKESPEARE = "../shared/data/tinyshakespeare/input.txt"
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
    from cacher.engines import length_sorted_batches

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


def train_variant(path: str, student_spec: str, batches: list[dict], variant: str, teacher, *, lr: float,
                  warmup: int, eval_batches: list[dict]) -> dict:
    """Train a fresh layer-dropped student on `batches` with one variant's loss; held-out metrics after."""
    from trainer.losses import cross_entropy_loss, dense_kd_loss, sparse_kd_loss, tail_sample_targets
    from trainer.train import _schedule, evaluate_heldout

    torch.manual_seed(0)
    student = make_student(path, student_spec, teacher.config.vocab_size).to(device()).train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))
    total = len(batches)  # the schedule `kdtrain run` uses: linear warm-up, then cosine down to 10% of lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, warmup, total))
    started = time.perf_counter()
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
            loss, _ = dense_kd_loss(flat_logits, t_logits.reshape(-1, t_logits.shape[-1])[:, :vocab], targets, mask)
        else:
            k = batch["topk_ids"].shape[-1]
            target_lp = batch["target_logprob"].reshape(-1) if variant.startswith("topk-") and not variant.endswith(
                "-notarget") else None
            ids, top_lp, tail = batch["topk_ids"].reshape(-1, k), batch["topk_logprobs"].reshape(-1, k), \
                batch["tail_logprob"].reshape(-1)
            if variant.startswith("tail-"):  # as trainer.train._sparse_loss does with a tail-sampled cache
                m = batch["tail_ids"].shape[-1]
                ids, top_lp, tail = tail_sample_targets(ids, top_lp, tail, batch["tail_ids"].reshape(-1, m),
                                                        batch["tail_counts"].reshape(-1, m))
            loss, _ = sparse_kd_loss(flat_logits, ids, top_lp, tail, targets, mask, target_logprob=target_lp)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    result = evaluate_heldout(student, eval_batches, None, has_teacher=False)
    return {"eval_ppl": result["eval_ppl"], "eval_ce": math.log(result["eval_ppl"]), "train_s": seconds}


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
        elif variant.startswith("topk-"):
            stored = stored_by_k[int(variant.split("-")[1])]
            a, b = stored["offsets"][i], stored["offsets"][i + 1]
            row.update(topk_ids=stored["topk_ids"][a:b], topk_logprobs=stored["topk_logprobs"][a:b],
                       tail_logprob=stored["tail_logprob"][a:b])
            if not variant.endswith("-notarget"):
                row["target_logprob"] = stored["target_logprob"][a:b]
        elif variant.startswith("rs-"):
            rs_ids, counts = rs_by_n[int(variant.split("-")[1])][i]
            row.update(topk_ids=rs_ids, topk_logprobs=rs_logprobs(counts),
                       tail_logprob=np.full(len(ids), -np.inf, dtype=np.float32))
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="teacher; 'tiny' = the trained tiny Shakespeare GPT-2")
    ap.add_argument("--dataset", default="builtin:pydoc-topics")
    ap.add_argument("--student", default="drop:6",
                    help="drop:N = the teacher keeping N layers; else a JSON config file (random init)")
    ap.add_argument("--ks", default="8,32,64,256")
    ap.add_argument("--notarget-ks", default="64", help="K values also trained with K + 1 buckets (no target bucket)")
    ap.add_argument("--rs", default="16,64", help="RS-KD sample counts (empty: none)")
    ap.add_argument("--tail", default="48+16,56+8,64+16",
                    help="K+M: top-K plus M tail samples (kdcache build --top-k K --tail-samples M); empty: none")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seeds", default="0", help="data-order seeds (repeats); medians are reported")
    ap.add_argument("--eval-sequences", type=int, default=128)
    ap.add_argument("--tiny-teacher-steps", type=int, default=150)
    ap.add_argument("--quick", action="store_true",
                    help="tiny teacher, tiny Shakespeare, 2-of-4-layer student, 80 steps x 2048 tokens")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.dataset, args.student = "tiny", SHAKESPEARE, QUICK_STUDENT
        args.steps, args.batch_tokens, args.max_length, args.lr, args.warmup = 80, 2048, 128, 2e-3, 5
        args.eval_sequences = 64
    from pathlib import Path

    from cacher.engines import load_hf_teacher, score_hf
    from cacher.models import load_tokenizer
    from shared.data import load_sequences
    from shared.writer import validate_shard_arrays
    from trainer.data import collate, epoch_order, pack_batches

    if args.dataset == SHAKESPEARE:
        args.dataset = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt")
    path = tiny_teacher(args.tiny_teacher_steps) if args.model == "tiny" else model_path(args.model)
    if args.student == QUICK_STUDENT:
        import json

        args.student = str(bench_home() / QUICK_STUDENT)
        Path(args.student).parent.mkdir(parents=True, exist_ok=True)
        Path(args.student).write_text(json.dumps(QUICK_STUDENT_CONFIG))
    ks = [int(k) for k in args.ks.split(",") if k]
    rs = [int(n) for n in args.rs.split(",") if n]
    tails = [t for t in args.tail.split(",") if t]
    seeds = [int(s) for s in args.seeds.split(",")]
    tokenizer = load_tokenizer(path)
    teacher = load_hf_teacher(path, dtype="float32")
    ks = [k for k in ks if k <= teacher.vocab_size]
    notarget_ks = [int(k) for k in args.notarget_ks.split(",") if k and int(k) in ks]

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
    capture_s = time.perf_counter() - started
    from trainer.train import evaluate_heldout

    teacher_ppl = evaluate_heldout(teacher.model, eval_batches, None, has_teacher=False)["eval_ppl"]
    teacher.model.eval()  # evaluate_heldout leaves a model in train mode (dropout on)
    torch.manual_seed(0)
    student_params = num_parameters(make_student(path, args.student, teacher.model.config.vocab_size))
    torch.manual_seed(0)
    init_ppl = evaluate_heldout(make_student(path, args.student, teacher.model.config.vocab_size), eval_batches, None,
                                False)["eval_ppl"]

    # -- train every variant on the same batches, per seed --
    variants = (["ce", "dense"] + [f"topk-{k}" for k in ks] + [f"topk-{k}-notarget" for k in notarget_ks]
                + [f"rs-{n}" for n in rs] + [f"tail-{t}" for t in tails])
    lengths = np.asarray([len(s) for s in train_seqs])
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for seed in seeds:
        order = epoch_order(len(train_seqs), seed, 0)
        spans = pack_batches(lengths[order], args.batch_tokens)[: args.steps]
        for variant in variants:
            rows = variant_rows(variant, train_seqs, stored_by_k, rs_by_n, stored_tail)
            has_teacher = variant.startswith(("topk-", "rs-", "tail-"))
            batches = [collate([rows[i] for i in order[a:b]], has_teacher) for a, b in spans]
            runs[variant].append(train_variant(path, args.student, batches, variant, teacher.model, lr=args.lr,
                                               warmup=args.warmup, eval_batches=eval_batches))
            print(f"seed {seed} {variant}: held-out ppl {runs[variant][-1]['eval_ppl']:.3f}", flush=True)

    table = {}
    for variant in variants:
        ce = median([r["eval_ce"] for r in runs[variant]])
        kept = [(c["eval_ce"] - r["eval_ce"]) / (c["eval_ce"] - d["eval_ce"])
                for c, d, r in zip(runs["ce"], runs["dense"], runs[variant])]
        kept_ppl = [(c["eval_ppl"] - r["eval_ppl"]) / (c["eval_ppl"] - d["eval_ppl"])
                    for c, d, r in zip(runs["ce"], runs["dense"], runs[variant])]
        entry = {"eval_ppl": median([r["eval_ppl"] for r in runs[variant]]), "eval_ce": ce,
                 "gain_kept": median(kept), "gain_kept_ppl": median(kept_ppl),
                 "per_seed_ppl": [r["eval_ppl"] for r in runs[variant]]}
        if variant.startswith("topk-"):
            entry["mean_topk_mass"] = float(stored_by_k[int(variant.split("-")[1])]["mass"])
        if variant.startswith("tail-"):
            entry["mean_topk_mass"] = float(stored_tail[variant[len("tail-"):]]["mass"])
        if variant.startswith("rs-"):
            n = int(variant.split("-")[1])
            entry["mean_distinct_ids"] = float(np.mean(np.concatenate([(c > 0).sum(1) for _, c in rs_by_n[n]])))
        table[variant] = entry
    at64 = table.get("topk-64", {}).get("gain_kept")
    at64_tail = max([v["gain_kept"] for name, v in table.items() if name.startswith("tail-")
                     and sum(int(x) for x in name[len("tail-"):].split("+")) == 64], default=None)
    emit({"id": "P6", "model": args.model if args.model != "tiny" else f"tiny-teacher ({path})",
          "dataset": args.dataset.split("/")[-1], "student": args.student,
          "student_params": student_params, "teacher_params": num_parameters(teacher.model), "steps": len(spans),
          "batch_tokens": args.batch_tokens, "train_tokens": int(lengths[order][: spans[-1][1]].sum()),
          "eval_tokens": int(sum(b["num_loss_tokens"] for b in eval_batches)), "seeds": seeds,
          "teacher_eval_ppl": teacher_ppl, "student_init_eval_ppl": init_ppl, "capture_s": capture_s,
          "variants": table, "target": ">= 0.95 of the dense gain at K=64 (64 stored entries per row)",
          "met_top64": bool(at64 is not None and at64 >= 0.95),
          "met_64_entries_with_tail_samples": bool(at64_tail is not None and at64_tail >= 0.95)}, args.json)


if __name__ == "__main__":
    main()
