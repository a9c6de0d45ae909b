"""Untrusted caches through `kdcache info`, `ls` and `verify` (issue 14, classes 4 and 5).

Text read from a cache reaches the terminal shown, never interpreted: control characters (an ESC that
would start a terminal escape sequence, a carriage return, a bidi override) come out as escapes and rich
markup as its literal text. A FIFO where a cache has a file never hangs a command.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.kdcache import app
from shared.writer import BuildHeader, CacheWriter
from tests.shared.fakes import header, random_sequence

runner = CliRunner()
TEACHER = "\x1b[2J\x1b[31mevil\r[bold red]boom[/bold red]\u202eteacher"
DATASET = "[link=https://evil.example]click me[/link]\x07"


@pytest.fixture
def hostile_names(tmp_path):
    """A valid cache whose teacher and data set names carry terminal escapes and rich markup."""
    base = header(1)
    root = tmp_path / "share"
    url = root / "c"
    named = BuildHeader({**base.teacher, "name": TEACHER}, base.tokenizer, {**base.dataset, "name": DATASET},
                        base.settings, num_shards=1)
    with CacheWriter(str(url), named) as w:
        with w.shard(0) as buf:
            buf.add_sequence(**random_sequence(np.random.default_rng(0), 9), source_index=0)
        w.finalize()
    return root, url


def assert_inert(output: str) -> None:
    """No control character but newlines reached the output, and the names are there as text, markup included."""
    assert not any(ord(c) < 32 and c not in "\n" for c in output), repr(output)
    assert "\u202e" not in output
    for literal in ("\\x1b[2J\\x1b[31mevil\\x0d[bold red]boom[/bold red]\\u202eteacher",
                    "[link=https://evil.example]click me[/link]\\x07"):
        assert literal in output, (literal, output)


WIDE = {"COLUMNS": "400"}  # rich wraps or crops cells to the terminal's width


def test_info_shows_hostile_names_as_text(hostile_names):
    _, url = hostile_names
    res = runner.invoke(app, ["info", str(url)], env=WIDE)
    assert res.exit_code == 0, res.output
    assert_inert(res.output)


def test_ls_shows_hostile_names_as_text(hostile_names):
    root, _ = hostile_names
    res = runner.invoke(app, ["ls", str(root)], env=WIDE)
    assert res.exit_code == 0, res.output
    assert_inert(res.output)
    res = runner.invoke(app, ["ls", str(root), "--json"])
    [line] = res.output.splitlines()
    assert json.loads(line)["teacher"] == TEACHER and "\x1b" not in line  # JSON escapes it


def test_verify_error_quoting_a_hostile_name_shows_it_as_text(hostile_names):
    """A flipped byte in the dataset's name: the refusal quotes both names (against build.json), as text."""
    _, url = hostile_names
    raw = json.loads((url / "manifest.json").read_text())
    raw["teacher"]["name"] = raw["teacher"]["name"].replace("boom", "bOom")
    (url / "manifest.json").write_text(json.dumps(raw))
    res = runner.invoke(app, ["verify", str(url)], env=WIDE)
    assert res.exit_code == 1 and "fields that differ from build.json: teacher.name" in " ".join(res.output.split())
    assert not any(ord(c) < 32 and c not in "\n" for c in res.output) and "[bold red]bOom[/bold red]" in res.output


@pytest.mark.timeout(120)
def test_a_fifo_manifest_never_hangs_info_ls_or_verify(tmp_path):
    from tests.shared.fakes import write_cache

    root = tmp_path / "share"
    write_cache(str(root / "c"), num_shards=1)
    (root / "c" / "manifest.json").unlink()
    os.mkfifo(root / "c" / "manifest.json")
    for args in (["info", str(root / "c")], ["verify", str(root / "c")]):
        res = runner.invoke(app, args)
        assert res.exit_code in (1, 2) and "manifest.json is not a regular file" in " ".join(res.output.split())
    res = runner.invoke(app, ["ls", str(root)])
    assert res.exit_code == 0 and "broken" in res.output and "manifest.json is not a regular file" in \
        " ".join(res.output.split())


def test_verify_checks_every_row(tmp_path):
    """`kdcache verify` decodes every row: a value no checksum guards (resealed) is named by shard, row and rule."""
    from shared.encode import encode_zarr_group
    from shared.reader import CacheReader
    from tests.shared.fakes import write_cache
    from tests.shared.test_hostile import replace_object

    url = tmp_path / "c"
    write_cache(str(url), num_shards=2)
    codes = np.asarray(CacheReader(str(url)).shard(1)._arrays["topk_id_codes"][:]).copy()
    codes[4, 1] = codes[4, 0]  # one id twice in the row, once decoded
    for key, data in encode_zarr_group({"topk_id_codes": codes}, chunk_rows=8192).items():
        if "/" in key:
            replace_object(url, f"shards/shard-00001/{key}", data)
    res = runner.invoke(app, ["verify", str(url)], env=WIDE)
    text = " ".join(res.output.split())
    assert res.exit_code == 1 and "BAD shard-00001: rows: shard-00001: topk_ids row 4: breaks the rule that a row's K " \
                                  "ids are distinct" in text, text
