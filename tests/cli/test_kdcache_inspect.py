"""`kdcache info / verify / ls / finalize` through typer's CliRunner."""

import json
import os

from typer.testing import CliRunner

from cli.kdcache import app
from tests.shared.fakes import write_cache

runner = CliRunner()


def test_info_table_and_json(tmp_path):
    url = str(tmp_path / "c")
    write_cache(url, num_shards=2)
    res = runner.invoke(app, ["info", url])
    assert res.exit_code == 0, res.output
    assert "fake-teacher" in res.output and "bytes per token x K" in res.output
    res = runner.invoke(app, ["info", url, "--json"])
    d = json.loads(res.stdout)
    assert d["num_shards"] == 2 and d["settings"]["top_k"] == 8
    assert 0 < d["mean_topk_mass"] < 1
    assert d["bytes_per_token_k"] == d["num_bytes"] / (d["num_tokens"] * 8)


def test_verify_good_and_bad(tmp_path):
    url = str(tmp_path / "c")
    write_cache(url, num_shards=2)
    res = runner.invoke(app, ["verify", url])
    assert res.exit_code == 0 and "OK" in res.output
    key = "shards/shard-00000/topk_id_codes/c/0/0"
    path = os.path.join(url, key)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[5] ^= 1
    with open(path, "wb") as f:
        f.write(bytes(data))
    os.remove(os.path.join(url, "shards/shard-00001/input_ids/zarr.json"))
    res = runner.invoke(app, ["verify", url])
    assert res.exit_code == 1
    assert key in res.output and "shard-00001" in res.output and "missing" in res.output


def test_info_on_incomplete_cache_exits_nonzero(tmp_path):
    url = str(tmp_path / "c")
    write_cache(url, num_shards=2)
    os.remove(os.path.join(url, "manifest.json"))
    res = runner.invoke(app, ["info", url])
    assert res.exit_code == 2 and "incomplete cache" in res.output


def test_ls_lists_complete_and_building(tmp_path):
    write_cache(str(tmp_path / "a"), num_shards=1)
    write_cache(str(tmp_path / "team" / "b"), num_shards=2)
    os.remove(tmp_path / "team" / "b" / "manifest.json")
    res = runner.invoke(app, ["ls", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["path"], r["complete"]) for r in rows] == [("a", True), ("team/b", False)]
    assert rows[1]["shards_committed"] == 2
    key = rows[0]["cache_key"]
    res = runner.invoke(app, ["ls", str(tmp_path), "--key", key[:10], "--json"])
    assert [json.loads(x)["path"] for x in res.stdout.splitlines()] == ["a"]
    res = runner.invoke(app, ["ls", str(tmp_path)])
    assert "building" in res.output and "2/2" in res.output


def test_finalize_writes_manifest(tmp_path):
    url = str(tmp_path / "c")
    write_cache(url, num_shards=2)
    os.remove(os.path.join(url, "manifest.json"))
    res = runner.invoke(app, ["finalize", url])
    assert res.exit_code == 0, res.output
    assert os.path.exists(os.path.join(url, "manifest.json"))


def test_ls_missing_root(tmp_path):
    res = runner.invoke(app, ["ls", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "does not exist" in res.output
