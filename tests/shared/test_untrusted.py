"""A shared cache is untrusted input (issue 14, classes 1 to 4): identity, Zarr metadata, rows, files.

1. Identity: the cache_key is recomputed from the manifest's own header wherever a cache is opened; a bit
   flipped in any field of the manifest is refused (its seal); a relabelled cache is never reused.
2. Zarr metadata that changes meaning (chunk_key_encoding, fill_value: tests/shared/test_hostile.py) and a
   missing chunk: nothing is read as an implicit fill; an all-zero chunk is stored.
3. Rows that cannot be a teacher's distribution: every rule of storage_layout.md 3.4 is refused by the writer,
   by the reader on the rows it returns and by verify, naming the shard, the row and the rule.
4. Files that are not regular files: FIFOs, links to devices and huge files are refused before they are read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from shared.catalog import find_by_key, find_caches
from shared.encode import encode_zarr_group
from shared.format import CacheError, CacheFormatError, CacheIdentityError, UnsafePathError
from shared.reader import CacheReader
from shared.writer import BuildHeader, CacheWriter, validate_shard_arrays
from tests.shared.fakes import TOP_K, VOCAB, header, random_sequence, write_cache
from tests.shared.stored import read_shard, rewrite_shard, stored_form
from tests.shared.test_hostile import load_manifest, replace_object
from tests.shared.test_tail_samples import M, write_tail_cache


@pytest.fixture
def cache(tmp_path) -> Path:
    root = tmp_path / "c"
    write_cache(str(root), num_shards=2)
    return root


# ---------------------------------------------------------------------------------------------
# 1. Identity


def flip_a_bit(value):
    """The value with one bit changed: an integer's lowest bit, a float's bit 30, a string's first character's lowest
    bit."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value ^ 1
    if isinstance(value, float):  # bit 30 of the float64: a change in the 7th significant digit or so
        return float(np.array([value]).view(np.int64)[0:1].__xor__(1 << 30).view(np.float64)[0])
    return chr(ord(value[0]) ^ 1) + value[1:]


HEADER_FIELDS = [("teacher", "name"), ("teacher", "dtype"), ("teacher", "engine"), ("tokenizer", "vocab_size"),
                 ("tokenizer", "vocab_sha256"), ("tokenizer", "name"), ("dataset", "fingerprint"),
                 ("dataset", "num_sequences"), ("dataset", "name"), ("settings", "max_length"), ("settings", "top_k"),
                 ("settings", "chunk_rows"), ("settings", "mode"), (None, "created_at"), (None, "tool_version"),
                 ("totals", "mean_topk_mass"), ("shards.0", "topk_mass_sum")]


@pytest.mark.parametrize("section,field", HEADER_FIELDS, ids=[f"{s or 'top'}.{f}" for s, f in HEADER_FIELDS])
def test_a_bit_flipped_in_any_manifest_field_is_refused(cache, section, field):
    """Without resealing (damage, a careless edit): the key or the seal catches it; verify and a reader refuse."""
    raw = json.loads((cache / "manifest.json").read_text())
    where = raw if section is None else raw["shards"][0] if section == "shards.0" else raw[section]
    where[field] = flip_a_bit(where[field])
    (cache / "manifest.json").write_text(json.dumps(raw, indent=1))
    with pytest.raises(CacheFormatError, match="manifest: ") as refused:
        CacheReader(str(cache))
    if isinstance(refused.value, CacheIdentityError) and section in ("teacher", "tokenizer", "dataset", "settings"):
        assert f"{section}.{field}: " in str(refused.value)  # a header field: named against build.json


def test_key_mismatch_names_the_fields_that_differ_from_build_json(cache):
    raw = json.loads((cache / "manifest.json").read_text())
    raw["settings"]["max_length"] = 65  # the key no longer matches the header; the rest is left as it was
    (cache / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(CacheIdentityError, match=r"manifest: cache_key [0-9a-f]{12}\.\.\. is not the key of its own "
                                                 r"header .*; fields that differ from build.json: "
                                                 r"settings.max_length: 64 -> 65\. Rebuild the cache"):
        CacheReader(str(cache))


def test_a_relabelled_cache_is_never_reused(tmp_path):
    """A cache of another teacher whose manifest claims the key of the build you ask for (sealed again, so only
    the key's recomputation from its own header tells): find_by_key, what `kdcache build` reuses, skips it."""
    from tests.shared.fakes import reseal

    root = tmp_path / "share"
    mine = header(2)
    theirs = BuildHeader({**mine.teacher, "name": "another-teacher", "weights_sha256": "e" * 64}, mine.tokenizer,
                         mine.dataset, mine.settings, num_shards=2)
    with CacheWriter(str(root / "theirs"), theirs) as w:
        for s in w.pending_shards():
            with w.shard(s) as buf:
                buf.add_sequence(**random_sequence(np.random.default_rng(s), 9), source_index=s)
        w.finalize()
    raw = json.loads((root / "theirs" / "manifest.json").read_text())
    raw["cache_key"] = mine.cache_key
    (root / "theirs" / "manifest.json").write_text(json.dumps(reseal(raw, rekey=False)))
    assert find_by_key(str(root), mine.cache_key) is None
    [summary] = find_caches(str(root))
    assert not summary["complete"] and "is not the key of its own header" in summary["error"]
    with pytest.raises(CacheIdentityError, match=r"build.json agrees with the header \(key [0-9a-f]{12}\.\.\.\): the "
                                                 r"manifest's cache_key was relabelled"):
        CacheReader(str(root / "theirs"))


def test_a_damaged_build_json_is_refused_on_resume(tmp_path):
    url = tmp_path / "c"
    with CacheWriter(str(url), header(2)) as w, w.shard(0) as buf:
        buf.add_sequence(**random_sequence(np.random.default_rng(0), 9), source_index=0)
    build = json.loads((url / "build.json").read_text())
    build["settings"]["max_length"] = 65
    (url / "build.json").write_text(json.dumps(build))
    with pytest.raises(CacheFormatError, match="build.json: its cache_key is not the key of its own header"), \
            CacheWriter(str(url), header(2)):
        pass


def test_a_damaged_commit_file_is_not_a_commit(tmp_path):
    """A flipped digit in a commit file's sha256 (still valid JSON and a valid entry) breaks its seal: rewritten."""
    url = tmp_path / "c"
    with CacheWriter(str(url), header(2)) as w, w.shard(0) as buf:
        buf.add_sequence(**random_sequence(np.random.default_rng(0), 9), source_index=0)
    commit_file = url / "shards" / "shard-00000" / "commit.json"
    commit = json.loads(commit_file.read_text())
    key = min(commit["objects"])
    sha = commit["objects"][key]["sha256"]
    commit["objects"][key]["sha256"] = ("0" if sha[0] != "0" else "1") + sha[1:]
    commit_file.write_text(json.dumps(commit))
    with CacheWriter(str(url), header(2)) as w:
        assert w.pending_shards() == [0, 1]


# ---------------------------------------------------------------------------------------------
# 2. Zarr metadata and chunks: nothing read as an implicit fill


def test_a_missing_chunk_is_refused_not_read_as_fill(cache):
    manifest = load_manifest(cache)
    key = "shards/shard-00001/topk_prob_steps/c/0/0"
    (cache / key).unlink()
    with pytest.raises(CacheError, match=f"shard-00001: {key}: missing"):
        CacheReader(str(cache))
    manifest["shards"][1]["objects"].pop(key)  # and unlisted as well, sizes resealed: the manifest refuses it
    manifest["totals"]["num_bytes"] = sum(o["size"] for s in manifest["shards"] for o in s["objects"].values())
    from tests.shared.test_hostile import save_manifest

    save_manifest(cache, manifest)
    with pytest.raises(CacheFormatError, match=r"manifest: shard-00001 lists 17 objects, but \d+ rows in chunks of "
                                               r"8,192 rows imply 18 \(a missing chunk would be read as fill values\)"):
        CacheReader(str(cache))


def test_a_chunk_deleted_after_opening_is_refused_when_read(cache):
    reader = CacheReader(str(cache))
    view = reader.shard(1)
    (cache / "shards/shard-00001/topk_id_codes/c/0/0").unlink()
    with pytest.raises(CacheError, match="shard-00001: topk_id_codes: chunk c/0/0 is missing; the format stores every "
                                         "chunk"):
        view.read_rows(0, 3)


def test_a_chunk_of_zeros_is_stored(tmp_path):
    """Zarr skips chunks equal to the fill value unless told not to; the format stores every chunk."""
    objects = encode_zarr_group({"loss_mask": np.zeros(10, bool), "input_ids": np.zeros(10, np.uint16)}, chunk_rows=4)
    assert {k for k in objects if "/c/" in k} == {f"{n}/c/{i}" for n in ("loss_mask", "input_ids") for i in range(3)}


# ---------------------------------------------------------------------------------------------
# 3. Rows that cannot be a teacher's distribution: every rule of section 3.4


def _first_inner_row(a: dict, offsets: np.ndarray, next_in_topk=False) -> int:
    """A row that is not its sequence's last, whose next token is (or is not) among its top K and its draws."""
    last = set((offsets[1:] - 1).tolist())
    for r in range(len(a["input_ids"]) - 1):
        if r in last:
            continue
        nxt = a["input_ids"][r + 1]
        if (nxt in a["topk_ids"][r]) == next_in_topk and nxt not in a["tail_ids"][r]:
            return r
    raise AssertionError("no such row in the fixture")


def _set_row(a, r, topk_probs, tail, target):
    a["topk_logprobs"][r] = np.log(np.asarray(topk_probs)).astype(np.float16)
    a["tail_logprob"][r] = np.float16(np.log(tail) if tail > 0 else -np.inf)
    a["target_logprob"][r] = np.float16(target)


def _outside(a, o):
    return _first_inner_row(a, o)


MUTATIONS = {  # rule: mutate the stored arrays (in place) of a shard, return the row broken
    "input-ids-in-vocabulary": lambda a, o: (a["input_ids"].__setitem__(2, VOCAB), 2)[1],
    "topk-ids-in-vocabulary": lambda a, o: (a["topk_ids"].__setitem__((3, 2), VOCAB), 3)[1],
    "topk-ids-distinct": lambda a, o: (a["topk_ids"].__setitem__((4, 1), a["topk_ids"][4, 0]), 4)[1],
    "topk-logprobs-valid": lambda a, o: (a["topk_logprobs"].__setitem__((5, 0), np.nan), 5)[1],
    "topk-logprobs-sorted": lambda a, o: (a["topk_logprobs"].__setitem__((1, slice(0, 2)), a["topk_logprobs"][1, 1::-1]), 1)[1],
    "topk-mass-at-most-1": lambda a, o: (a["topk_logprobs"].__setitem__(6, np.float16(np.log(1.05 / TOP_K))), 6)[1],
    "tail-logprob-valid": lambda a, o: (a["tail_logprob"].__setitem__(2, 0.5), 2)[1],
    "tail-is-the-rest": lambda a, o: (a["topk_logprobs"].__setitem__(3, a["topk_logprobs"][3] - 1), 3)[1],  # p / e
    "target-sentinel": lambda a, o: (a["target_logprob"].__setitem__(2, 1.0), 2)[1],  # the sentinel off a last row
    "target-agrees-with-topk": lambda a, o: (a["target_logprob"].__setitem__(_outside(a, o), a["topk_logprobs"][_outside(a, o), 0]), _outside(a, o))[1],
    "target-within-tail": lambda a, o: (_set_row(a, _outside(a, o), [0.5, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.04], 0.01, np.log(0.04)), _outside(a, o))[1],
    "loss-mask-not-on-last-row": lambda a, o: (a["loss_mask"].__setitem__(int(o[1]) - 1, True), int(o[1]) - 1)[1],
    "tail-ids-in-vocabulary": lambda a, o: (a["tail_ids"].__setitem__((2, 0), VOCAB), 2)[1],
    "tail-counts-sum-to-m": lambda a, o: (a["tail_counts"].__setitem__((4, 0), a["tail_counts"][4, 0] + 1), 4)[1],
    "tail-counts-sorted": lambda a, o: (a["tail_counts"].__setitem__(5, [1, 2, 1, 1, 1, 0]), 5)[1],
    "no-draws-on-empty-tail": lambda a, o: (_set_row(a, _outside(a, o), [1 / TOP_K] * TOP_K, 0.0, -10.0), _outside(a, o))[1],
    "tail-ids-distinct": lambda a, o: (a["tail_ids"].__setitem__((6, 1), a["tail_ids"][6, 0]), 6)[1],
}


@pytest.fixture(scope="module")
def tail_cache_master(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rows") / "c"
    write_tail_cache(str(root), seqs=4)
    return root


# Rules no stored row can break (storage_layout.md 3.1): decoded ids are values of a permutation of [0, V), decoded
# log-probs are 2 ln(c / L) + ln s with codes non-increasing along K, so sorted and at most ln s <= 0. The writer
# checks them on the values it is given; stored_form cannot encode such values.
STORED_CANNOT_BREAK = ("topk-ids-in-vocabulary", "topk-logprobs-valid", "topk-logprobs-sorted")


def stored_shard(root: Path, index: int = 1) -> tuple[dict, np.ndarray]:
    """Every row field of shard `index` as a reader returns it (the top K decoded), and its offsets."""
    rows, _, offsets = read_shard(root, index)
    return rows, offsets


def rule_text(name: str) -> str:
    from shared.rows import INVARIANTS

    return next(i.rule for i in INVARIANTS if i.name == name)


@pytest.mark.parametrize("rule", list(MUTATIONS))
def test_every_row_rule_is_refused_by_writer_reader_and_verify(tail_cache_master, tmp_path, rule):
    import re

    root = tmp_path / "c"
    shutil.copytree(tail_cache_master, root)
    arrays, offsets = stored_shard(root)
    before = {k: v.copy() for k, v in arrays.items()}
    row = MUTATIONS[rule](arrays, offsets)
    said = re.escape(rule_text(rule))
    # the writer, given these values
    given = {k: (v.astype(np.float32) if v.dtype == np.float16 else v.astype(np.int64) if v.dtype.kind == "u" else v)
             for k, v in arrays.items()}
    with pytest.raises(CacheFormatError, match=rf"shard-00001: .*row {row}: breaks the rule that {said}"):
        validate_shard_arrays({**given, "offsets": offsets}, vocab_size=VOCAB, top_k=TOP_K, where="shard-00001",
                              tail_samples=M)
    # a cache holding them, resealed
    _, stored, _ = read_shard(root)
    if rule in STORED_CANNOT_BREAK:  # hostile stored bytes that decode to nothing: tests/shared/test_hostile.py
        with pytest.raises(ValueError):
            stored_form(arrays, before, stored, root)
        return
    rewrite_shard(root, 1, stored_form(arrays, before, stored, root))
    reader = CacheReader(str(root), verify_on_read=True)
    with pytest.raises(CacheFormatError, match=rf"shard-00001: .*row {row}: breaks the rule that {said}"):
        reader.shard(1).read_rows(0, int(offsets[-1]), tuple(arrays))
    problems = CacheReader(str(root)).verify(rows=True)
    assert [(p.shard, p.object) for p in problems] == [("shard-00001", "rows")]
    assert re.search(rf"row {row}: breaks the rule that {said}", problems[0].message)


@pytest.mark.parametrize("case", ["a row's mask flipped", "every mask row zero"])
def test_loss_mask_must_match_the_meta_rows_and_the_manifest(tail_cache_master, tmp_path, case):
    root = tmp_path / "c"
    shutil.copytree(tail_cache_master, root)
    arrays, offsets = stored_shard(root)
    mask = arrays["loss_mask"]
    if case == "every mask row zero":
        mask[:] = False
    else:
        mask[int(offsets[1]) + 1] = not mask[int(offsets[1]) + 1]
    for key, data in encode_zarr_group({"loss_mask": mask}, chunk_rows=8192).items():
        if "/" in key:
            replace_object(root, f"shards/shard-00001/{key}", data)
    with pytest.raises(CacheFormatError, match=r"shard-00001: loss_mask of sequence \d+: breaks the rule that each "
                                               r"sequence's loss_mask has as many true rows as its meta row's"):
        CacheReader(str(root)).shard(1).read_rows(0, int(offsets[-1]))
    [problem] = CacheReader(str(root)).verify(rows=True)
    assert problem.shard == "shard-00001" and "loss_mask" in problem.message


def test_loss_rows_before_the_prompt_ends_are_refused(tmp_path):
    url = tmp_path / "c"
    rng = np.random.default_rng(3)
    seq = random_sequence(rng, 12)
    seq["loss_mask"][:4] = False  # a prompt of 5 tokens: rows 0..3 predict prompt tokens
    with CacheWriter(str(url), header(1)) as w:
        with w.shard(0) as buf:
            buf.add_sequence(**seq, source_index=0, prompt_length=5)
        w.finalize()
    mask = seq["loss_mask"].copy()
    mask[1] = True
    for key, data in encode_zarr_group({"loss_mask": mask}, chunk_rows=8192).items():
        if "/" in key:
            replace_object(url, f"shards/shard-00000/{key}", data)
    with pytest.raises(CacheFormatError, match=r"shard-00000: loss_mask row 1: breaks the rule that loss_mask is false "
                                               r"on "
                                               r"the rows before prompt_length - 1 .*prompt_length 5"):
        CacheReader(str(url)).shard(0).read_rows(0, 12)


def test_the_sentinel_missing_on_a_last_row_is_refused(tail_cache_master, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(tail_cache_master, root)
    arrays, offsets = stored_shard(root)
    last = int(offsets[1]) - 1
    arrays["target_logprob"][last] = -1.0
    for key, data in encode_zarr_group({"target_logprob": arrays["target_logprob"]}, chunk_rows=8192).items():
        if "/" in key:
            replace_object(root, f"shards/shard-00001/{key}", data)
    with pytest.raises(CacheFormatError, match=f"target_logprob row {last}: breaks the rule that target_logprob is the "
                                               "sentinel"):
        CacheReader(str(root)).shard(1).read_rows(0, int(offsets[-1]))


def test_a_target_whose_next_token_is_in_the_next_block_is_checked(tail_cache_master, tmp_path):
    """The reader reads the next block's first input id, so the block's last row's target is checked too."""
    root = tmp_path / "c"
    shutil.copytree(tail_cache_master, root)
    arrays, offsets = stored_shard(root)
    r = int(offsets[1]) - 2  # second to last row of sequence 0: its next token is row r + 1
    arrays["target_logprob"][r] = arrays["topk_logprobs"][r, 0] if arrays["input_ids"][r + 1] not in arrays["topk_ids"][r] \
        else arrays["topk_logprobs"][r, 0] - 3
    for key, data in encode_zarr_group({"target_logprob": arrays["target_logprob"]}, chunk_rows=8192).items():
        if "/" in key:
            replace_object(root, f"shards/shard-00001/{key}", data)
    view = CacheReader(str(root)).shard(1)
    view.read_rows(0, r)  # rows before it are fine
    with pytest.raises(CacheFormatError, match=f"row {r}: breaks the rule that target_logprob lies within"):
        view.read_rows(0, r + 1)


# ---------------------------------------------------------------------------------------------
# 4. Files that are not regular files, and sizes bounded before reading


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["manifest.json", "build.json", "shards/shard-00000/commit.json",
                                  "shards/shard-00001/topk_id_codes/zarr.json", "meta/shard-00000.parquet"])
def test_a_fifo_never_hangs_a_reader_verify_or_a_writer(cache, name):
    (cache / name).unlink()
    os.mkfifo(cache / name)
    if name == "manifest.json":
        with pytest.raises(UnsafePathError, match="manifest.json is not a regular file"):
            CacheReader(str(cache))
        summary = find_caches(str(cache.parent))[0]
        assert "manifest.json is not a regular file" in summary["error"]
        with pytest.raises(UnsafePathError, match="manifest.json is a special file where the format has a file"), \
                CacheWriter(str(cache), header(2)):
            pass
        return
    problems = CacheReader(str(cache), check_sizes=False).verify(bookkeeping=True, rows=True)
    assert any(p.object == name for p in problems), problems
    if not name.endswith(("build.json", "commit.json")):  # content: a reader refuses it at opening
        with pytest.raises(CacheError, match=f"{name}: is not a regular file"):
            CacheReader(str(cache))


@pytest.mark.timeout(60)
def test_a_fifo_lock_file_never_hangs_a_builder(tmp_path):
    url = tmp_path / "c"
    write_cache(str(url), num_shards=2)
    (url / "manifest.json").unlink()
    (url / "locks").mkdir(exist_ok=True)
    os.mkfifo(url / "locks" / "worker-00000-of-00001.json")
    with pytest.raises(UnsafePathError, match="locks/worker-00000-of-00001.json is not a regular file"), \
            CacheWriter(str(url), header(2)):
        pass


def test_a_manifest_linked_to_dev_zero_is_never_opened(cache):
    (cache / "manifest.json").unlink()
    os.symlink("/dev/zero", cache / "manifest.json")
    with pytest.raises(UnsafePathError, match="manifest.json is a symbolic link"):
        CacheReader(str(cache))


def test_a_huge_manifest_is_refused_by_its_size_before_reading(cache):
    import tracemalloc

    with open(cache / "manifest.json", "r+b") as f:
        f.truncate(600 * 2**20)  # sparse: 600 MiB that read as zeros
    tracemalloc.start()
    try:
        with pytest.raises(CacheFormatError, match=r"manifest.json is 629,145,600 bytes, over the 536,870,912 bytes"):
            CacheReader(str(cache))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_a_link_leaving_the_root_is_refused_for_reading(cache, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.move(str(cache / "meta"), outside)
    os.symlink(outside, cache / "meta")
    with pytest.raises(CacheError, match="meta/shard-00000.parquet: resolves outside the cache"):
        CacheReader(str(cache))
