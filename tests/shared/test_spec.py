"""storage_layout.md against the code: the section 9 example has the fields and the arithmetic of a real manifest."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shared.encode import array_descriptions
from shared.manifest import TOP_LEVEL_KEYS, ShardEntry, make_totals
from tests.shared.fakes import write_cache

SPEC = Path(__file__).resolve().parents[2] / "storage_layout.md"


def example() -> dict:
    text = SPEC.read_text()
    section = text[text.index("## 9. Example `manifest.json`"):text.index("## 10.")]
    return json.loads(re.search(r"```json\n(.*?)```", section, re.DOTALL)[1])


def test_section_9_example_has_the_fields_a_writer_writes(tmp_path):
    ex = example()
    write_cache(str(tmp_path / "c"), num_shards=1)
    real = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert list(ex) == [k for k in TOP_LEVEL_KEYS if k in ex] and set(real) - set(ex) <= {"extensions"}
    assert ex["arrays"] == array_descriptions(ex["tokenizer"]["vocab_size"], 0, top_k=ex["settings"]["top_k"],
                                              chunk_rows=ex["settings"]["chunk_rows"])
    assert set(ex["shards"][0]) == set(real["shards"][0]) == set(ShardEntry.__dataclass_fields__)
    assert set(ex["totals"]) == set(real["totals"])
    assert set(ex["settings"]) >= {"mode", "top_k", "max_length", "chunk_rows"}


def test_section_9_example_adds_up():
    ex = example()
    shard, totals = ex["shards"][0], ex["totals"]
    entry = make_totals([ShardEntry(**{**shard, "objects": {}})])
    for key in ("num_shards", "num_sequences", "num_tokens", "num_loss_tokens"):
        assert totals[key] == entry[key]
    assert totals["mean_topk_mass"] == pytest.approx(shard["topk_mass_sum"] / shard["num_tokens"], abs=5e-4)
    assert shard["num_loss_tokens"] == shard["num_tokens"] - shard["num_sequences"]  # plain text: all but each last row
    assert ex["dataset"]["num_sequences"] == shard["num_sequences"]
    listed = sum(o["size"] for o in shard["objects"].values())
    assert listed < totals["num_bytes"]  # abridged: a few of the shard's objects
    per_entry = totals["num_bytes"] / (totals["num_tokens"] * ex["settings"]["top_k"])
    assert 1.8 < per_entry < 2.2  # BENCHMARKS.md P4: about 2 bytes per token x K at K = 64 (issue 16: <= 2.2)
    prose = SPEC.read_text().split("## 9.")[1].split("```json")[0]
    assert f"{totals['num_bytes']:,} bytes = {per_entry:.2f} bytes per token x K" in " ".join(prose.split())
    rows = shard["num_tokens"]
    chunk = ex["settings"]["chunk_rows"]
    chunks = -(-rows // chunk)
    assert {k.rsplit("/c/", 1)[1] for k in shard["objects"] if "/topk_id_codes/c/" in k} == \
        {f"{i}/0" for i in range(chunks)}


def test_section_3_4_is_the_table_the_code_checks():
    """One table of row invariants: storage_layout.md 3.4 lists shared.rows.INVARIANTS by name, arrays and rule, in
    order, and the two sequence rules; the writer, the reader and verify all check that table."""
    from shared.rows import INVARIANTS, SEQUENCE_INVARIANTS

    text = SPEC.read_text()
    section = text[text.index("### 3.4 Row invariants"):text.index("## 4. Per-sequence metadata")]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| ([^|]*?) \| ([^|]*) \|$", section, re.MULTILINE)
    assert rows == [(i.name, ", ".join(f"`{a}`" for a in i.arrays), i.rule) for i in INVARIANTS]
    sequence_rules = re.findall(r"^\| `(loss-[a-z-]+)` \| ([^|]*) \|$", section, re.MULTILINE)
    assert [rule.split(" (and so")[0] for _, rule in sequence_rules] == list(SEQUENCE_INVARIANTS)
