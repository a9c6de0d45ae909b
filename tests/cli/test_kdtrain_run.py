"""`kdtrain run` through typer's CliRunner: a run with non-TTY output, and every refused input.

Each refusal exits with code 2 and a message that names the problem and the fix.
"""

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from cli.kdtrain import app
from tests.trainer.teacher_cache import write_teacher_cache

runner = CliRunner()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_gpt2_dir):
    return write_teacher_cache(str(tmp_path_factory.mktemp("cli-cache") / "c"), tiny_gpt2_dir, num_sequences=40,
                               shard_tokens=800)


def run(*args):
    res = runner.invoke(app, ["run", *map(str, args)])
    return res.exit_code, " ".join(res.output.split())  # rich wraps long lines


def test_run_without_a_tty_prints_progress_and_summary(cache, tmp_path):
    out = tmp_path / "o"
    code, text = run("--cache", cache, "--student-from-teacher", "--keep-layers", 1, "--steps", 3, "--batch-tokens",
                     256, "--eval-every", 2, "--out", out)
    assert code == 0, text
    assert "step 3/3" in text and "done: 3 steps" in text and "eval_kl=" in text
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["status"] == "complete" and run_json["config"]["keep_layers"] == 1
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--loss", "kl2"], "--loss must be one of fkl, rkl, jsd, skl, srkl, tvd, ce; got 'kl2'"),
    (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--loss", "jsd", "--beta", "1"], "--beta must be in (0, 1)"),
    ([], "give exactly one of --student, --student-from-teacher (with --keep-layers), --student-config; got none"),
    (["--student", "x", "--student-config", "y.json"], "got --student and --student-config"),
    (["--student-from-teacher"], "--student-from-teacher needs --keep-layers N"),
])
def test_bad_arguments(cache, tmp_path, args, message):
    code, text = run("--cache", cache, "--out", tmp_path / "o", *args)
    assert code == 2 and message in text, text
    assert not (tmp_path / "o").exists()


def test_dataset_path_needs_ce(tmp_path, tiny_gpt2_dir):
    code, text = run("--dataset", "builtin:pydoc-topics", "--student", tiny_gpt2_dir, "--out", tmp_path / "o")
    assert code == 2 and "without --cache there is no teacher: use --loss ce" in text


COMMON = ("--student-from-teacher", "--keep-layers", 1, "--steps", 1, "--batch-tokens", 256)


def test_a_run_refused_at_the_cache_leaves_no_out_folder(cache, tmp_path):
    """--out is claimed before the cache is opened; a refusal there removes the folder the run made (it held only
    the marker), and a rerun with the right cache works in the same place."""
    out = tmp_path / "o"
    code, text = run("--cache", tmp_path / "no-such-cache", "--out", out, *COMMON)
    assert code == 2 and "no-such-cache" in text and "kdcache build" in text, text
    assert not out.exists()
    code, text = run("--cache", cache, "--out", out, *COMMON)
    assert code == 0, text


def snapshot(folder) -> dict:
    """Every entry under folder (links not followed) with its kind and bytes: to show nothing changed."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    out[rel] = ("file", f.read())
            else:
                out[rel] = ("dir", None)
    return out


def marker_of(out) -> dict:
    return json.loads((out / "owner.json").read_text())


def test_nonempty_out_refused_without_resume_or_overwrite(cache, tmp_path):
    out = tmp_path / "o"
    code, text = run("--cache", cache, "--out", out, *COMMON)
    assert code == 0, text
    marker = marker_of(out)
    assert marker["tool"] == "kdtrain" and marker["kind"] == "run" and len(marker["id"]) == 32
    assert {"model.safetensors", "config.json"} <= set(marker["files"])  # the student's files, listed as it saved them
    assert not (out / "run.lock").exists()  # released at the end
    before = snapshot(out)
    code, text = run("--cache", cache, "--out", out, *COMMON)
    assert code == 2 and "is not empty; pass --resume" in text and "--overwrite" in text
    assert snapshot(out) == before


def hf_model_folder(path, tiny_gpt2_dir):
    shutil.copytree(tiny_gpt2_dir, path)


def cache_folder(path, _):
    """A cache with the marker kdcache writes when it creates one (owner.json of kind cache)."""
    shutil.copytree(CACHE[0], path)
    if not (path / "owner.json").exists():
        (path / "owner.json").write_text(json.dumps({"tool": "kdcache", "kind": "cache", "id": "cd" * 16,
                                                     "created_at": "2026-12-04T00:00:00Z"}))


def old_cache_folder(path, _):
    """A cache without a marker (written before markers, or copied without it)."""
    shutil.copytree(CACHE[0], path)
    if (path / "owner.json").exists():
        (path / "owner.json").unlink()


def users_folder(path, _):
    path.mkdir()
    (path / "notes.txt").write_text("keep")
    (path / "meta").mkdir()  # a name a cache uses too, in a folder that is no cache: still the user's
    (path / "meta" / "plan.txt").write_text("mine")


def old_run_folder(path, _):
    """A run folder of a kdtrain before markers: run.json, metrics.jsonl, checkpoints/ and the student."""
    path.mkdir()
    (path / "run.json").write_text('{"status": "complete"}')
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (path / "checkpoints").mkdir()
    (path / "model.safetensors").write_bytes(b"weights")


CACHE = []  # the module's cache, for cache_folder


@pytest.mark.parametrize("flag", [None, "--resume", "--overwrite"])
@pytest.mark.parametrize("make,message", [
    (hf_model_folder, "is a model folder (it holds config.json, generation_config.json, model.safetensors, "),
    (cache_folder, ("owner.json marks it as a 'kdcache' 'cache' folder, not a kdtrain run folder, so kdtrain cannot "
                    "tell what it owns in ")),
    (old_cache_folder, "is a kdcache cache (it holds build.json, "),  # the rest of the sentence: the next assertion
    (users_folder, ("is a folder kdtrain did not create (it holds meta, notes.txt; no owner.json). Pass a new or "
                    "empty folder as --out, or delete that one by hand")),
    (old_run_folder, "is a model folder (it holds model.safetensors)"),
], ids=["model", "cache", "old-cache", "user", "old-run"])
def test_out_that_is_not_a_run_folder_is_neither_deleted_nor_written(cache, tmp_path, tiny_gpt2_dir, make, message,
                                                                     flag):
    """A teacher's model folder as --out with --overwrite had its weights deleted; with --resume, overwritten.
    Whatever the flag, an unmarked non-empty folder is refused, naming it, and not one byte in it changes."""
    CACHE[:] = [cache]
    out = tmp_path / "target"
    make(out, tiny_gpt2_dir)
    before = snapshot(out)
    code, text = run("--cache", cache, "--out", out, *COMMON, *([flag] if flag else []))
    assert code == 2 and (f"--out {out} {message}" in text or f"{out}/{message}" in text), text
    if make in (hf_model_folder, old_run_folder):
        assert "): kdtrain never writes into or deletes a model's files. Pass a new or empty folder as --out" in text
    if make is old_cache_folder:
        assert "manifest.json, meta, shards): a cache is never a run folder. Pass a new or empty folder" in text, text
    assert snapshot(out) == before


def test_overwrite_deletes_only_what_kdtrain_wrote(cache, tmp_path):
    out = tmp_path / "o"
    code, text = run("--cache", cache, "--out", out, *COMMON, "--save-every", 1)
    assert code == 0, text
    first = marker_of(out)["id"]
    (out / "notes.txt").write_text("the user's")
    (out / "extra").mkdir()
    (out / "extra" / "data.bin").write_bytes(b"mine")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # to see it replaced
    code, text = run("--cache", cache, "--out", out, *COMMON, "--overwrite")
    assert code == 0, text
    assert "kept what kdtrain did not write: extra, notes.txt" in text
    assert (out / "notes.txt").read_text() == "the user's" and (out / "extra" / "data.bin").read_bytes() == b"mine"
    assert "9.0" not in (out / "metrics.jsonl").read_text()
    assert not (out / "checkpoints").exists()  # the first run's; this one saved none
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert marker_of(out)["id"] != first  # a new run


@pytest.mark.parametrize("name", ["checkpoints", "metrics.jsonl", "run.json"])
@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_links_in_a_run_folder_are_never_followed(cache, tmp_path, name, flag):
    """A run folder in which an owned name is a symbolic link (to someone's folder or file): refused before anything
    is written or deleted, naming the link; what it points to is untouched."""
    out = tmp_path / "o"
    code, text = run("--cache", cache, "--out", out, *COMMON, "--save-every", 1)
    assert code == 0, text
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    target = victim if name == "checkpoints" else victim / "precious.txt"
    _remove(out / name)
    os.symlink(target, out / name)
    before, outside = snapshot(out), snapshot(victim)
    code, text = run("--cache", cache, "--out", out, *COMMON, flag)
    assert code == 2 and f"{out / name} in run folder {out} is a symbolic link" in text, text
    assert snapshot(out) == before and snapshot(victim) == outside


def _remove(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def test_out_that_is_a_link_or_has_a_bad_marker_is_refused(cache, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    code, text = run("--cache", cache, "--out", tmp_path / "link", *COMMON)
    assert code == 2 and f"--out {tmp_path / 'link'} is a symbolic link" in text and str(real) in text
    assert list(real.iterdir()) == []
    forged = tmp_path / "forged"  # a marker whose file list reaches outside the folder
    forged.mkdir()
    (forged / "owner.json").write_text(json.dumps({"tool": "kdtrain", "kind": "run", "id": "0" * 32,
                                                         "files": ["../victim"]}))
    (forged / "run.json").write_text("{}")
    (tmp_path / "victim").write_text("keep")
    code, text = run("--cache", cache, "--out", forged, *COMMON, "--overwrite")
    assert code == 2 and f"{forged / 'owner.json'} is not a kdtrain run marker" in text, text
    assert (tmp_path / "victim").read_text() == "keep" and (forged / "run.json").exists()


def test_second_run_into_a_held_folder_is_refused_naming_the_holder(cache, tmp_path):
    """In one process, the way two processes meet (flock is per open file; the multiproc test uses two processes)."""
    import socket

    from trainer.run_folder import RunFolder

    out = tmp_path / "o"
    held = RunFolder.open(str(out), resume=False, overwrite=False, log=lambda m: None)
    try:
        code, text = run("--cache", cache, "--out", out, *COMMON)
        assert code == 2, text
        assert (f"--out {out} is in use by another kdtrain run: pid {os.getpid()} on host {socket.gethostname()} "
                "since 20") in text and "Wait for it to end or stop it, or pass another --out" in text
    finally:
        held.release()
    code, text = run("--cache", cache, "--out", out, *COMMON)
    assert code == 0, text


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(cache, tmp_path):
    """What a chain does with a train stage killed early: `kdtrain run ... --resume` on its folder succeeds from
    step 0, and metrics.jsonl holds each step once."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "owner.json").write_text(json.dumps({"tool": "kdtrain", "kind": "run", "id": "ab" * 16, "files": []}))
    (out / "run.json").write_text(json.dumps({"status": "running"}))
    (out / "metrics.jsonl").write_text('{"step": 0, "eval_kl": 5.0}\n{"step": 1, "loss": 9.0}\n')
    (out / "checkpoints").mkdir()
    code, text = run("--cache", cache, "--out", out, "--student-from-teacher", "--keep-layers", 1, "--steps", 2,
                     "--batch-tokens", 256, "--eval-every", 1, "--resume")
    assert code == 0, text
    assert "holds no complete checkpoint" in text and "starting over from step 0" in text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert [r["step"] for r in rows if "eval_kl" in r] == [0, 1, 2]
    assert all(r.get("loss") != 9.0 for r in rows)


def test_incomplete_and_corrupt_cache_refused(cache, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    chunk = broken / "shards" / "shard-00001" / "topk_id_codes" / "c" / "0" / "0"  # format 3's top-K ids
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x55  # same size: only hashing finds it
    chunk.write_bytes(bytes(data))
    common = ("--student-from-teacher", "--keep-layers", 1, "--steps", 1)
    code, text = run("--cache", broken, "--out", tmp_path / "o", *common)
    assert code == 2 and "damaged" in text and "shard-00001" in text and "topk_id_codes" in text and "Rebuild" in text
    os.remove(broken / "manifest.json")
    code, text = run("--cache", broken, "--out", tmp_path / "o2", *common)
    assert code == 2 and "incomplete cache" in text and "Rerun the same `kdcache build`" in text


def test_student_with_other_tokenizer_refused(cache, tmp_path):
    from tests.conftest import build_tiny_model, train_tokenizer

    train_tokenizer(tmp_path / "tok", vocab_size=300)
    other = build_tiny_model(tmp_path / "other-student", "gpt2", tmp_path / "tok")
    code, text = run("--cache", cache, "--student", other, "--out", tmp_path / "o", "--steps", 1)
    assert code == 2 and "other-student" in text and "differs from that of teacher" in text


def test_cache_built_elsewhere_needs_teacher(cache, tmp_path, tiny_gpt2_dir):
    from tests.shared.fakes import reseal

    moved = tmp_path / "moved"
    shutil.copytree(cache, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["teacher"]["path"] = "/nowhere/teacher"  # descriptive: not in the cache_key (the seal is recomputed)
    (moved / "manifest.json").write_text(json.dumps(reseal(manifest)))
    common = ("--cache", moved, "--student-from-teacher", "--keep-layers", 1, "--steps", 1, "--batch-tokens", 256)
    code, text = run(*common, "--out", tmp_path / "o")
    assert code == 2 and "'/nowhere/teacher' is not on this machine" in text and "--teacher FOLDER" in text
    code, text = run(*common, "--teacher", tiny_gpt2_dir, "--out", tmp_path / "o2")
    assert code == 0, text


def test_cache_without_loss_tokens_refused(tiny_gpt2_dir, tmp_path):
    import numpy as np

    from shared.writer import BuildHeader, CacheWriter

    url = str(tmp_path / "nomask")
    header = BuildHeader(teacher={"name": "t", "dtype": "float32", "engine": "hf", "engine_version": "x",
                                  "path": str(tiny_gpt2_dir)},
                         tokenizer={"name": "t", "vocab_size": 384, "vocab_sha256": "0" * 64},
                         dataset={"name": "d", "fingerprint": "f", "num_sequences": 1},
                         settings={"mode": "score", "top_k": 2, "max_length": 8}, num_shards=1)
    with CacheWriter(url, header) as w:
        with w.shard(0) as buf:
            buf.add_sequence(input_ids=np.arange(5), loss_mask=np.zeros(5, bool), topk_ids=np.tile([1, 2], (5, 1)),
                             topk_logprobs=np.tile([-1.0, -2.0], (5, 1)), target_logprob=[-1.0, -2.0, -3.0, -3.0, -3.0],
                             tail_logprob=np.full(5, np.log1p(-np.exp(-1.0) - np.exp(-2.0))), source_index=0)
        w.finalize()
    code, text = run("--cache", url, "--student-from-teacher", "--keep-layers", 1, "--steps", 1, "--out",
                     tmp_path / "o")
    assert code == 2 and "no rows with loss_mask set" in text


# ---------------------------------------------------------------------------------------------
# Padded embedding matrices: teacher rows > student rows > token ids (Qwen2.5-7B 152064 > 0.5B 151936 > 151665)


def test_student_with_fewer_padded_rows_than_the_teacher_trains(tmp_path, tiny_tokenizer_dir):
    """`kdcache build` on a teacher of 424 logit rows, `kdtrain run` of a student with 400, both for the 384 ids of
    one tokenizer: the cache's vocabulary is the tokenizer's (no padded id stored), so the student is accepted
    (it was refused: '400 embedding rows but teacher emits 424 token ids'), and the loss sees its first 384
    logits only: its padded rows get no gradient. A cache an older kdcache wrote with the teacher's padded ids
    (format 1: vocab_size 424, tokenizer_size 384) is refused with what to do, where every cache is opened."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from cli.kdcache import app as kdcache_app
    from tests.cacher.test_build import build_padded_model, write_speeches
    from tests.conftest import build_tiny_model

    teacher = build_padded_model(tmp_path / "teacher", "gpt2", tiny_tokenizer_dir, rows=424)
    student = build_tiny_model(tmp_path / "student", "gpt2", tiny_tokenizer_dir, seed=4)
    model = AutoModelForCausalLM.from_pretrained(student)
    model.resize_token_embeddings(400)
    model.save_pretrained(student, safe_serialization=True)
    data = write_speeches(tmp_path / "speeches.jsonl", num_rows=20)
    res = runner.invoke(kdcache_app, ["build", "--model", str(teacher), "--dataset", str(data), "--max-length", "48",
                                      "--top-k", "16", "--out", str(tmp_path / "cache"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[-1])["status"] == "built"
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == manifest["tokenizer"]["tokenizer_size"] == 384

    before = load_file(str(student / "model.safetensors"))["transformer.wte.weight"]
    code, text = run("--cache", tmp_path / "cache", "--student", student, "--steps", 3, "--batch-tokens", 256,
                     "--lr", 0.01, "--out", tmp_path / "run")
    assert code == 0, text
    assert "400 logit rows for 384 token ids" in text and "eval_kl=" in text
    after = load_file(str(tmp_path / "run" / "model.safetensors"))["transformer.wte.weight"]
    assert after.shape == (400, 64)
    assert torch.equal(after[384:], before[384:])  # padded rows: never in a softmax, never trained
    assert not torch.equal(after[:384], before[:384])

    old = tmp_path / "old-cache"  # what an older kdcache wrote: format 1, the teacher's row count as vocab_size
    shutil.copytree(tmp_path / "cache", old)
    manifest.update(format_version=1)
    manifest["tokenizer"]["vocab_size"] = 424
    (old / "manifest.json").write_text(json.dumps(manifest))
    code, text = run("--cache", old, "--student", student, "--steps", 1, "--out", tmp_path / "run-old")
    assert code == 2, text
    from shared.format import FORMAT_VERSION

    assert (f"this cache has format_version 1, written by an older kdcache; this kdcache reads version "
            f"{FORMAT_VERSION} only" in text and "Rebuild it with this kdcache" in text), text


@pytest.mark.parametrize("args,message", [
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "1e30"], ("--lr must be in (0, 1.0] (AdamW moves each weight by about lr per step; typical values are "
                        "1e-5 to 1e-2), got 1e+30")),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    (["--weight-decay", "2000"], ("--weight-decay must be >= 0 with --lr x --weight-decay < 1 (AdamW multiplies the "
                                  "weights by 1 - lr x weight_decay each step; at 1 or more it zeroes or flips them), "
                                  "got --weight-decay 2000.0 with --lr 0.0005")),
    (["--clip", "inf"], "--clip must be a finite number, got inf"),
    (["--epochs", "inf"], "--epochs must be a finite number, got inf"),
    (["--temperature", "1e-5"], "--temperature must be in [0.01, 100.0] (1.0 means no tempering), got 1e-05"),
    (["--alpha", "nan"], "--alpha must be a finite number, got nan"),
    (["--skip-nonfinite", "-1"], "--skip-nonfinite must be >= 0, got -1"),
], ids=["lr-inf", "lr-nan", "lr-1e30", "weight-decay-nan", "weight-decay-2000", "clip-inf", "epochs-inf",
        "temperature-1e-5", "alpha-nan", "skip-nonfinite-negative"])
def test_nonfinite_or_absurd_numbers_refused(cache, tmp_path, args, message):
    """--lr inf, --lr 1e30 and --weight-decay nan trained NaN students and saved them with exit 0."""
    code, text = run("--cache", cache, "--out", tmp_path / "o", *COMMON, *args)
    assert code == 2 and message in text, text
    assert not (tmp_path / "o").exists()
