"""`kdcache build --overwrite` through the CLI never deletes what kdcache did not create (issue 13, items 5 and 8).

The library-level cases (every kind of foreign folder, every link) are in tests/shared/test_ownership.py;
here the real command meets the two reported cases: a folder holding the user's own meta/ and shards/, and
an unfinished build whose shards/ was made a symbolic link.
"""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from cli.kdcache import app
from tests.reliability.common import write_speeches
from tests.shared.test_ownership import tree

runner = CliRunner()


@pytest.fixture
def build_args(tiny_gpt2_dir, tmp_path) -> list[str]:
    speeches = write_speeches(tmp_path / "speeches.jsonl", num_rows=12)
    return ["build", "--model", str(tiny_gpt2_dir), "--dataset", str(speeches), "--max-length", "32", "--top-k", "4",
            "--shard-tokens", "64", "--engine", "hf", "--no-reuse"]


def test_overwrite_of_a_folder_holding_the_users_meta_and_shards_deletes_nothing(build_args, tmp_path):
    out = tmp_path / "mine"
    (out / "meta").mkdir(parents=True)
    (out / "meta" / "labels.csv").write_text("id,label\n1,cat\n")
    (out / "shards").mkdir()
    (out / "shards" / "part-0.bin").write_bytes(b"\x01\x02")
    before = tree(out)
    res = runner.invoke(app, [*build_args, "--out", str(out), "--overwrite"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "is not a kdcache cache folder" in text and "nothing there was changed" in text, text
    assert tree(out) == before


def test_resuming_a_build_whose_shards_folder_is_a_link_writes_nothing_outside(build_args, tmp_path):
    out, outside = tmp_path / "cache", tmp_path / "elsewhere"
    res = runner.invoke(app, [*build_args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    (out / "manifest.json").unlink()  # as if the build had stopped before the end
    for commit in list((out / "shards").glob("*/commit.json"))[:2]:
        commit.unlink()
    os.rename(out / "shards", outside)
    os.symlink(outside, out / "shards")
    before = tree(outside)
    res = runner.invoke(app, [*build_args, "--out", str(out)])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "shards is a link where the format has a folder" in text, text
    assert tree(outside) == before and not (out / "manifest.json").exists()
