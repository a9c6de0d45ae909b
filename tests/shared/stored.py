"""A shard's rows rewritten as someone with write access to a cache would (tests only): the rows a reader returns,
changed, then written back in the stored form of storage_layout.md 3.1 without any of the writer's checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.encode import encode_zarr_group
from shared.format import row_arrays
from shared.reader import CacheReader
from shared.topk_codec import encode_id_rows, log_topk_mass, prob_codes


def read_shard(root: Path, index: int = 1) -> tuple[dict, dict, np.ndarray]:
    """(every row field as a reader returns it, every stored array, offsets) of shard `index`."""
    reader = CacheReader(str(root))
    view = reader.shard(index)
    rows = view.read_rows(0, int(view.offsets[-1]), row_arrays(reader.manifest.tail_samples))
    stored = {name: np.asarray(array[:]).copy() for name, array in view._arrays.items()}
    return {k: v.copy() for k, v in rows.items()}, stored, view.offsets


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a == b) | (np.isnan(a) & np.isnan(b)) if a.dtype.kind == "f" else a == b


def stored_form(rows: dict, before: dict, stored: dict, root: Path) -> dict[str, np.ndarray]:
    """The stored arrays that change when the rows `before` (as read) become `rows`: a plain array as it is; topk_ids
    as codes and tables (every chunk); the changed rows of topk_logprobs as steps against their tail (a NaN or
    positive tail counts as -inf, as for a reader), the other rows' steps as they were. Raises ValueError for values
    the stored form cannot hold (an id >= V, a NaN or positive log-prob, a row not sorted)."""
    manifest = CacheReader(str(root)).manifest
    chunk_rows, levels = manifest.settings["chunk_rows"], manifest.arrays["topk_prob_steps"]["levels"]
    out = {name: values for name, values in rows.items()
           if name not in ("topk_ids", "topk_logprobs") and not _same(values, before[name]).all()}
    if not _same(rows["topk_ids"], before["topk_ids"]).all():
        out["topk_id_codes"], out["topk_id_table"] = encode_id_rows(
            rows["topk_ids"], min(chunk_rows, len(rows["topk_ids"])), manifest.vocab_size,
            manifest.arrays["topk_id_table"]["table_size"])
    changed = ~_same(rows["topk_logprobs"], before["topk_logprobs"]).all(axis=1)
    if changed.any():
        tail = rows["tail_logprob"][changed].astype(np.float32)
        tail = np.where(np.isnan(tail) | (tail > 0), -np.inf, tail)
        codes = prob_codes(rows["topk_logprobs"][changed].astype(np.float32), log_topk_mass(tail)[:, None], levels)
        steps = -np.diff(np.concatenate([np.full((len(codes), 1), levels), codes], axis=1), axis=1)  # c_{r-1} - c_r
        if (steps < 0).any():
            raise ValueError("a row of log-probs that is not sorted has no steps")
        out["topk_prob_steps"] = stored["topk_prob_steps"].copy()
        out["topk_prob_steps"][changed] = steps
    return out


def rewrite_shard(root: Path, index: int, arrays: dict[str, np.ndarray]) -> None:
    """Store `arrays` (stored names) in shard `index`, each object's size and sha256 recomputed in the manifest."""
    from tests.shared.test_hostile import replace_object

    chunk_rows = CacheReader(str(root)).manifest.settings["chunk_rows"]
    for key, data in encode_zarr_group(arrays, chunk_rows=chunk_rows).items():
        if "/" in key:
            replace_object(root, f"shards/shard-{index:05d}/{key}", data)
