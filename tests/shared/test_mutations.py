"""A small valid cache mutated at random (hypothesis): every mutant is refused, or reads back what it holds.

Four kinds of mutation, as someone with write access to a share (or a flipped bit) would make them:
- bytes: one bit flipped, one byte set, the object truncated or extended, in any object of the cache
  (chunks, zarr.json files, meta Parquet files, manifest.json, build.json, commit files, owner.json), with
  no checksum recomputed;
- zarr.json fields: a field of any array's or group's zarr.json set to another JSON value, added or removed,
  the object's size and sha256 recomputed in the manifest (and the manifest resealed);
- manifest fields: any field of manifest.json set to another JSON value, the seal (and, half the time,
  the cache_key) recomputed;
- stored values: one value of any array a shard stores (whatever the format stores it as), re-encoded by the
  format's encoder, the object's size and sha256 recomputed (and the seals).

Each mutant goes through `kdcache verify`'s function (CacheReader.verify with rows and bookkeeping) and
through the trainer's read path (the functions `kdtrain run` calls: CacheReader(verify_on_read=True),
verify() at start, every meta table, then every row in blocks of chunk_rows). For the first three kinds
the expectation is: refused by both, with a message naming the manifest or the shard (and the object or
row), or read back exactly equal to the original; bookkeeping files are never read by a trainer, so a
damaged one reads back equal and verify names it. A stored value can change to another that obeys every
rule of storage_layout.md 3.4 (no check can tell it from the teacher's: that is what `kdcache verify
--against-teacher` is for, section 8.1), so for that kind the expectation is: refused by both, naming the
shard, or read back by the trainer as rows that an independent, row-by-row reference of the rules (written
here, not shared.rows) finds valid, every other shard equal to the original (verify may still refuse such a
mutant, e.g. for a top-K mass the manifest does not record). At least 500 examples run in CI (`slow`); a
quick 60 run in the default suite.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.encode import encode_zarr_group
from shared.format import TARGET_SENTINEL, CacheError
from shared.reader import CacheReader
from shared.writer import CacheWriter
from tests.shared.fakes import TOP_K, VOCAB, header, random_sequence, reseal, reseal_commit
from tests.shared.test_tail_samples import M, with_tail

CHUNK_ROWS = 16
ROW_ARRAYS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "target_logprob", "tail_logprob", "tail_ids",
              "tail_counts")
BOOKKEEPING = re.compile(r"^(build\.json|owner\.json|shards/shard-\d+/commit\.json)$")


# ---------------------------------------------------------------------------------------------
# The cache, and what it reads back as


def write_master(root: Path) -> None:
    rng = np.random.default_rng(7)
    with CacheWriter(str(root), header(2, tail_samples=M, tail_seed=0), chunk_rows=CHUNK_ROWS) as w:
        for s in w.pending_shards():
            with w.shard(s) as buf:
                for i in range(3):
                    seq = with_tail(rng, random_sequence(rng, int(rng.integers(8, 30))))
                    buf.add_sequence(**seq, source_index=3 * s + i, text_sha256=f"{s}-{i}")
        w.finalize()


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def materialize(files: dict[str, bytes]) -> Path:
    root = Path(tempfile.mkdtemp(prefix="mutant-")) / "c"
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return root


@dataclass
class Outcome:
    refused: str | None  # the message, or None when accepted
    rows: dict | None = None  # shard index -> {array: values}, when accepted
    meta: dict | None = None  # shard index -> meta table as a dict, when accepted


def verify_as_kdcache(url: Path) -> Outcome:
    """What `kdcache verify` runs."""
    try:
        problems = CacheReader(str(url), check_sizes=False).verify(bookkeeping=True, rows=True)
    except CacheError as exc:
        return Outcome(str(exc))
    return Outcome("; ".join(map(str, problems)) or None)


def read_as_trainer(url: Path) -> Outcome:
    """What `kdtrain run` runs on a cache under 4 GiB: open with verify_on_read, verify() at start, read every meta
    table (its index), then every row in blocks of chunk_rows (its block cache)."""
    try:
        reader = CacheReader(str(url), verify_on_read=True)
        problems = reader.verify()
        if problems:
            return Outcome("; ".join(map(str, problems)))
        meta = {s: reader.meta(s).to_pydict() for s in range(reader.num_shards)}
        rows = {}
        for s in range(reader.num_shards):
            view, num_rows = reader.shard(s), reader.shards[s].num_tokens
            blocks = [view.read_rows(lo, min(lo + CHUNK_ROWS, num_rows), ROW_ARRAYS)
                      for lo in range(0, num_rows, CHUNK_ROWS)]
            rows[s] = {name: np.concatenate([b[name] for b in blocks]) for name in ROW_ARRAYS}
    except CacheError as exc:
        return Outcome(str(exc))
    return Outcome(None, rows, meta)


def same_rows(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        np.array_equal(a[s][n], b[s][n], equal_nan=a[s][n].dtype.kind == "f") and a[s][n].dtype == b[s][n].dtype
        for s in a for n in ROW_ARRAYS)


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    root = tmp_path_factory.mktemp("master") / "c"
    write_master(root)
    original = read_as_trainer(root)
    assert original.refused is None and verify_as_kdcache(root).refused is None
    reader = CacheReader(str(root))
    stored = {s: ({n: np.asarray(a[:]).copy() for n, a in reader.shard(s)._arrays.items()}) for s in range(2)}
    return files_of(root), original, stored


# ---------------------------------------------------------------------------------------------
# Resealing: what a writer to the share recomputes


def resealed(files: dict[str, bytes], changed: dict[str, bytes], *, rekey: bool = False) -> dict[str, bytes]:
    """files with `changed` objects written and every size, sha256 and seal recomputed to match."""
    files = {**files, **changed}
    manifest = json.loads(files["manifest.json"])
    for shard in manifest["shards"]:
        for key, data in changed.items():
            if key.startswith(shard["path"] + "/") or key == shard["meta_path"]:
                shard["objects"][key] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        commit_key = f"{shard['path']}/commit.json"
        commit = json.loads(files[commit_key])
        commit.update({k: shard[k] for k in ("objects", "topk_mass_sum")})
        files[commit_key] = json.dumps(reseal_commit(commit), indent=1).encode()
    manifest["totals"]["num_bytes"] = sum(o["size"] for s in manifest["shards"] for o in s["objects"].values())
    manifest["totals"]["mean_topk_mass"] = sum(s["topk_mass_sum"] for s in manifest["shards"]) / max(
        1, manifest["totals"]["num_tokens"])
    files["manifest.json"] = json.dumps(reseal(manifest, rekey=rekey), indent=1).encode()
    return files


# ---------------------------------------------------------------------------------------------
# The mutations


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6) | st.sampled_from([0, 0.0, False, "", "/", ".", "uint16", "float16", "blosc", "bytes", 8, 16]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=4)


def leaf_paths(obj, prefix=()):
    """Every path to a value in a JSON object (dict keys, list indices), containers included."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += leaf_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += leaf_paths(v, (*prefix, i))
    return out


def edit_json(obj, path, op: str, value):
    """Set, delete, or add a sibling key beside, the value at path (an index into dicts and lists)."""
    parent = obj
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if op == "set":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[f"{last}_extra"] = value
    else:
        parent.append(value)


@st.composite
def byte_mutation(draw, files):
    key = draw(st.sampled_from(sorted(files)))
    data = bytearray(files[key])
    op = draw(st.sampled_from(["flip", "set", "truncate", "extend"]))
    if op in ("flip", "set") and data:
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = data[pos] ^ (1 << draw(st.integers(0, 7))) if op == "flip" else draw(st.integers(0, 255))
    elif op == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    else:
        data += bytes([draw(st.integers(0, 255))])
    return "bytes", key, {key: bytes(data)}


@st.composite
def zarr_field_mutation(draw, files):
    key = draw(st.sampled_from(sorted(k for k in files if k.endswith("zarr.json"))))
    meta = json.loads(files[key])
    path = draw(st.sampled_from(leaf_paths(meta)))
    edit_json(meta, path, draw(st.sampled_from(["set", "delete", "add"])), draw(JSON_VALUES))
    return "zarr field", key, {key: json.dumps(meta).encode()}


@st.composite
def manifest_field_mutation(draw, files):
    manifest = json.loads(files["manifest.json"])
    manifest.pop("manifest_sha256")
    path = draw(st.sampled_from(leaf_paths(manifest)))
    edit_json(manifest, path, draw(st.sampled_from(["set", "set", "delete", "add"])), draw(JSON_VALUES))
    return "manifest field", "manifest.json", manifest, draw(st.booleans())


def value_strategy(old: np.generic):
    if old.dtype == np.bool_:
        return st.just(not old)
    if old.dtype.kind in "ui":
        top = int(np.iinfo(old.dtype).max)
        return st.integers(0, min(top, 2**31)) | st.sampled_from([max(0, int(old) - 1), min(top, int(old) + 1), 0, top])
    return (st.floats(-20, 0.01) | st.sampled_from([math.nan, math.inf, -math.inf, 1.0, 0.0])
            | st.floats(-0.05, 0.05).map(lambda d: float(old) + d))


@st.composite
def stored_value_mutation(draw, stored):
    """One element of one array a shard stores, set to another value, the array re-encoded by the format's encoder."""
    shard = draw(st.sampled_from(sorted(stored)))
    name = draw(st.sampled_from(sorted(stored[shard])))
    values = stored[shard][name].copy()
    where = tuple(draw(st.integers(0, n - 1)) for n in values.shape)
    values[where] = draw(value_strategy(values[where]))
    encoded = encode_zarr_group({name: values}, chunk_rows=CHUNK_ROWS)
    return "stored value", (shard, name, where), {f"shards/shard-{shard:05d}/{k}": v for k, v in encoded.items()
                                                  if k.startswith(name + "/")}


# ---------------------------------------------------------------------------------------------
# An independent reference of storage_layout.md 3.4 (row by row, float64; not shared.rows)


def rules_hold(a: dict, offsets: np.ndarray, meta: dict) -> bool | None:
    """True when every row and sequence obeys section 3.4, False when one does not, None when a value sits within
    1e-4 of a bound (float32 and float64 sums may fall on either side of it)."""
    near = False

    def at_most(lhs: float, rhs: float) -> bool:  # lhs <= rhs, unless decided by a hair
        nonlocal near
        if abs(lhs - rhs) <= 1e-4:
            near = True
            return True
        return lhs <= rhs

    last_rows = set((offsets[1:] - 1).tolist())
    f = {n: a[n].astype(np.float64) for n in ("topk_logprobs", "target_logprob", "tail_logprob")}
    for t in range(len(a["input_ids"])):
        ids, lp = [int(x) for x in a["topk_ids"][t]], f["topk_logprobs"][t]
        tail, target = f["tail_logprob"][t], f["target_logprob"][t]
        tails, counts = [int(x) for x in a["tail_ids"][t]], [int(x) for x in a["tail_counts"][t]]
        if max([*ids, *tails, int(a["input_ids"][t])]) >= VOCAB or len(set(ids + tails)) < TOP_K + M:
            return False
        if any(math.isnan(x) or x > 1e-3 for x in [*lp, tail]) or any(lp[k + 1] > lp[k] for k in range(TOP_K - 1)):
            return False
        mass = sum(math.exp(x) for x in lp)
        if not (at_most(mass, 1.02) and at_most(abs(math.exp(tail) + mass - 1), 0.0202)):
            return False
        if t in last_rows:
            if target != TARGET_SENTINEL or a["loss_mask"][t]:
                return False
        else:
            if math.isnan(target) or target > 1e-3:
                return False
            nxt = int(a["input_ids"][t + 1])
            entry = lp[ids.index(nxt)] if nxt in ids else lp[-1]
            tolerance = 2**-7 * (abs(entry) if math.isfinite(entry) else 0) + 1e-3
            if nxt in ids:
                if not (target == entry or at_most(abs(target - entry), tolerance)):
                    return False
            elif not (at_most(target, entry + tolerance) and at_most(math.exp(target), math.exp(tail) + 0.0202)):
                return False
        if any(c > M for c in counts) or sum(counts) not in (0, M) or any(counts[k + 1] > counts[k] for k in range(M - 1)):
            return False
        if tail == -math.inf and sum(counts):
            return False
    for i in range(len(offsets) - 1):
        mask = a["loss_mask"][offsets[i]:offsets[i + 1]]
        if int(mask.sum()) != meta["num_loss_tokens"][i] or mask[: max(0, meta["prompt_length"][i] - 1)].any():
            return False
    return None if near else True


# ---------------------------------------------------------------------------------------------
# The property


def names_where(message: str) -> bool:
    """A refusal names what it refuses: the manifest, a shard (and its object or row), or a bookkeeping file."""
    return bool(re.search(r"manifest|shard-\d{5}|build\.json|owner\.json", message))


def check_mutant(master, mutation) -> str:
    files, original, stored = master
    kind = mutation[0]
    if kind == "bytes":
        _, key, changed = mutation
        mutant = {**files, **changed}
    elif kind == "zarr field":
        _, key, changed = mutation
        mutant = resealed(files, changed)
    elif kind == "manifest field":
        _, key, manifest, rekey = mutation
        manifest = reseal(manifest, rekey=rekey)
        mutant = {**files, "manifest.json": json.dumps(manifest, indent=1).encode()}
    else:
        _, (shard, name, _), changed = mutation
        key = name
        mutant = resealed(files, changed)
    root = materialize(mutant)
    try:
        verified, read = verify_as_kdcache(root), read_as_trainer(root)
    finally:
        shutil.rmtree(root.parent)
    for refusal in (verified.refused, read.refused):
        assert refusal is None or names_where(refusal), refusal
    if kind == "stored value":
        if read.refused is not None:
            assert verified.refused and f"shard-{shard:05d}" in read.refused, (mutation[1], read.refused)
            return "refused"
        for s, rows in read.rows.items():  # a reader hands out rows that obey every rule, whatever it was given
            assert rules_hold(rows, stored[s]["offsets"], original.meta[s]) is not False, (mutation[1], s)
            if s != shard:
                assert same_rows({s: rows}, {s: original.rows[s]}), (mutation[1], s)
        return "accepted"
    if read.refused is None:  # a trainer reads nothing but the original
        assert same_rows(read.rows, original.rows) and read.meta == original.meta, (kind, key)
    else:
        assert verified.refused, (kind, key, read.refused)  # what a trainer refuses, verify refuses
    if verified.refused is None:
        assert read.refused is None, (kind, key)
    if kind == "bytes" and BOOKKEEPING.match(key):
        assert read.refused is None, (key, read.refused)  # never read by a trainer
    elif kind == "bytes" and key != "manifest.json" and changed[key] != files[key]:
        assert verified.refused and read.refused, key  # content bytes: a checksum always catches them
    return "refused" if read.refused or verified.refused else "accepted"


def mutations(master_files, stored):
    return st.one_of(byte_mutation(master_files), zarr_field_mutation(master_files),
                     manifest_field_mutation(master_files), stored_value_mutation(stored))


def run_property(master, examples: int) -> None:
    files, _, stored = master

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutation=mutations(files, stored))
    def prop(mutation):
        check_mutant(master, mutation)

    prop()


def test_mutants_are_refused_or_read_back_quickly(master):
    run_property(master, 60)


@pytest.mark.slow
def test_500_mutants_are_refused_or_read_back(master):
    run_property(master, 520)
