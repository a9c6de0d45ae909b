"""Each benchmark at its smallest size on a tiny model: it runs and reports its ratio (no timing asserts)."""

import json

import pytest


@pytest.mark.slow
def test_p3_capture_speed_smoke(tiny_gpt2_dir, tmp_path):
    from bench.p3_capture_speed import main

    out = tmp_path / "r.jsonl"
    main(["--model", str(tiny_gpt2_dir), "--tokens", "256", "--max-length", "64", "--repeats", "1", "--top-k", "8",
          "--json", str(out)])
    row = json.loads(out.read_text())
    assert row["id"] == "P3" and row["ratio_capture_over_bare"] > 0


@pytest.mark.slow
def test_p4_storage_smoke(tiny_gpt2_dir, tmp_path):
    from bench.p4_storage import main

    out = tmp_path / "r.jsonl"
    main(["--model", str(tiny_gpt2_dir), "--tokens", "512", "--max-length", "64", "--json", str(out)])
    row = json.loads(out.read_text())
    ks = sorted({r["K"] for r in row["rows"]})
    assert ks == [16, 64, 128] and all(r["bytes_per_token_k"] > 0 for r in row["rows"])
