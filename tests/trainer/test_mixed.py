"""trainer/mixed.py: batches drawn from two sources at a stated share, deterministic and resumable."""

import numpy as np
import pytest

from trainer.data import Source
from trainer.loader import Batcher
from trainer.mixed import MixedBatcher, mix_draw


def source(tag: int, num: int) -> Source:
    """num sequences of 4 tokens whose ids say which source and item they are (tag * 1000 + item)."""
    def read(which):
        return [{"input_ids": np.full(4, tag * 1000 + w, dtype=np.int64), "loss_mask": np.ones(4, dtype=bool)}
                for w in which]
    return Source(list(range(num)), np.full(num, 4, dtype=np.int64), np.arange(num), read, False)


def make(src, cursor):
    return Batcher(src, batch_tokens=8, seed=3, cursor=cursor)  # 2 sequences per batch


def tags(batch) -> list[int]:
    return sorted({int(t) // 1000 for t in batch.input_ids[:, 0]})


def test_each_batch_comes_from_one_source_at_the_stated_share():
    mixed = MixedBatcher(make, source(1, 10), source(2, 6), 0.3, seed=0)
    try:
        drawn = [tags(next(mixed)) for _ in range(400)]
    finally:
        mixed.close()
    assert all(len(t) == 1 for t in drawn)
    share = sum(t == [2] for t in drawn) / len(drawn)
    assert abs(share - 0.3) < 0.07  # 400 draws: standard deviation 0.023
    assert [t == [2] for t in drawn] == [mix_draw(0, i) < 0.3 for i in range(400)]


def test_the_sources_sequence_is_a_pure_function_of_seed_and_batch_number():
    assert [mix_draw(5, i) for i in range(20)] == [mix_draw(5, i) for i in range(20)]
    assert [mix_draw(5, i) for i in range(20)] != [mix_draw(6, i) for i in range(20)]
    assert all(0 <= mix_draw(0, i) < 1 for i in range(100))


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_share_zero_and_one_use_one_source_only(share):
    mixed = MixedBatcher(make, source(1, 4), source(2, 4), share, seed=0)
    try:
        assert {tuple(tags(next(mixed))) for _ in range(30)} == {(2,) if share else (1,)}
    finally:
        mixed.close()


def test_a_resumed_batcher_continues_with_the_same_batches():
    def ids(batch):
        return batch.input_ids[:, 0].tolist()

    whole = MixedBatcher(make, source(1, 7), source(2, 5), 0.5, seed=1)
    try:
        expected = [ids(next(whole)) for _ in range(40)]
    finally:
        whole.close()
    first = MixedBatcher(make, source(1, 7), source(2, 5), 0.5, seed=1)
    try:
        got = [ids(next(first)) for _ in range(13)]
        cursor = first.cursor
    finally:
        first.close()
    assert cursor["draws"] == 13 and 0 < cursor["from_mix"] < 13 and cursor["epoch"] == cursor["main"]["epoch"]
    second = MixedBatcher(make, source(1, 7), source(2, 5), 0.5, seed=1, cursor=cursor)
    try:
        got += [ids(next(second)) for _ in range(27)]
    finally:
        second.close()
    assert got == expected


def test_a_share_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        MixedBatcher(make, source(1, 2), source(2, 2), 1.5, seed=0)


# ---------------------------------------------------------------------------------------------
# kdtrain run --mix-cache


def quiet(message):
    pass


@pytest.fixture(scope="module")
def mix_cache(tmp_path_factory, tiny_llama_dir):
    """Another teacher (the tiny Llama) over fewer windows, with the same tokenizer as tiny_cache's GPT-2."""
    from tests.trainer.teacher_cache import write_teacher_cache

    return write_teacher_cache(str(tmp_path_factory.mktemp("mix") / "llama"), tiny_llama_dir, num_sequences=50,
                               top_k=8)


def mixed_run(cache, mix_cache, out, **extra):
    from trainer.config import TrainConfig
    from trainer.train import train

    settings = {"cache": cache, "mix_cache": mix_cache, "mix": 0.4, "student_from_teacher": True, "keep_layers": 1,
                "batch_tokens": 256, "seed": 2, "steps": 12, "grad_accum": 2, "lr": 2e-3, **extra}
    return train(TrainConfig(out=str(out), **settings), log=quiet)


def test_a_mixed_run_draws_its_batches_as_stated_and_resumes_bit_exact(tiny_cache, mix_cache, tmp_path):
    import torch
    from safetensors.torch import load_file

    from trainer.checkpoint import latest_checkpoint, read_state

    mixed_run(tiny_cache, mix_cache, tmp_path / "full", save_every=12)
    state = read_state(latest_checkpoint(str(tmp_path / "full")))
    cursor = state["cursors"][0]
    assert cursor["draws"] == 24  # 12 steps x 2 micro-batches
    assert cursor["from_mix"] == sum(mix_draw(2, i) < 0.4 for i in range(24)) > 0
    assert state["data"]["mix"] == 0.4 and len(state["data"]["mix_cache_key"]) == 64
    mixed_run(tiny_cache, mix_cache, tmp_path / "part", save_every=4, stop_after=6)
    mixed_run(tiny_cache, mix_cache, tmp_path / "part", save_every=4, resume=True)
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    alone = tmp_path / "alone"  # the same run without the mix cache trains on other batches
    from trainer.config import TrainConfig
    from trainer.train import train

    train(TrainConfig(out=str(alone), cache=tiny_cache, student_from_teacher=True, keep_layers=1, batch_tokens=256,
                      seed=2, steps=12, grad_accum=2, lr=2e-3), log=quiet)
    c = load_file(str(alone / "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resuming_with_another_mix_is_refused(tiny_cache, mix_cache, tmp_path):
    from trainer.errors import TrainError

    mixed_run(tiny_cache, mix_cache, tmp_path / "r", save_every=2, stop_after=2)
    with pytest.raises(TrainError, match=r"other data settings \(mix 0.4 -> 0.6\)"):
        mixed_run(tiny_cache, mix_cache, tmp_path / "r", save_every=2, resume=True, mix=0.6)


def test_resuming_with_a_mix_added_or_dropped_is_refused(tiny_cache, mix_cache, tmp_path):
    """A mixed checkpoint resumed without {mix_cache}, or a plain one resumed with it, would restart the data order
    (or crash on the other cursor's shape): both are refused as other data settings."""
    from trainer.config import TrainConfig
    from trainer.errors import TrainError
    from trainer.train import train

    mixed_run(tiny_cache, mix_cache, tmp_path / "mixed", save_every=2, stop_after=2)
    plain = {"cache": tiny_cache, "student_from_teacher": True, "keep_layers": 1, "batch_tokens": 256, "seed": 2,
             "steps": 12, "grad_accum": 2, "lr": 2e-3}
    with pytest.raises(TrainError, match=r"other data settings \(mix_cache_key '[0-9a-f]{64}' -> None; mix 0.4 -> 0.0"):
        train(TrainConfig(out=str(tmp_path / "mixed"), resume=True, **plain), log=quiet)
    train(TrainConfig(out=str(tmp_path / "plain"), save_every=2, stop_after=2, **plain), log=quiet)
    with pytest.raises(TrainError, match=r"other data settings \(mix_cache_key None -> '[0-9a-f]{64}'; mix 0.0 -> 0.4"):
        mixed_run(tiny_cache, mix_cache, tmp_path / "plain", save_every=2, resume=True)


def test_a_mix_caches_sequence_too_long_for_the_student_is_refused_naming_the_mix_cache(tiny_llama_dir, tiny_cache,
                                                                                         tmp_path):
    """The main cache's windows fit the student (32 of its 48 positions), the mix cache's (64) do not: the refusal
    names the mix cache, where the sequence is."""
    import json

    from tests.trainer.teacher_cache import write_teacher_cache
    from trainer.config import TrainConfig
    from trainer.errors import TrainError
    from trainer.train import train

    short = write_teacher_cache(str(tmp_path / "short"), tiny_llama_dir, num_sequences=30, max_length=32, top_k=8)
    config = tmp_path / "student.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 48}))
    with pytest.raises(TrainError, match=rf"^cache {tiny_cache}: \d+ sequence\(s\) are longer than the context"):
        train(TrainConfig(out=str(tmp_path / "o"), cache=short, mix_cache=tiny_cache, mix=0.5,
                          student_config=str(config), steps=1, batch_tokens=256), log=quiet)


def test_epochs_count_passes_over_the_main_cache_with_the_mix_on_top(tiny_cache, mix_cache, tmp_path):
    """--epochs 1 --mix 0.5 draws as many batches from the main cache as --epochs 1 alone (twice the steps);
    at --mix 1 only the mix cache is drawn, so --epochs counts its passes."""
    from trainer.config import TrainConfig
    from trainer.train import train

    common = {"student_from_teacher": True, "keep_layers": 1, "batch_tokens": 512, "seed": 2, "epochs": 1.0}
    alone = train(TrainConfig(out=str(tmp_path / "a"), cache=tiny_cache, **common), log=quiet)["steps"]
    half = train(TrainConfig(out=str(tmp_path / "b"), cache=tiny_cache, mix_cache=mix_cache, mix=0.5, **common),
                 log=quiet)["steps"]
    only_mix = train(TrainConfig(out=str(tmp_path / "c"), cache=mix_cache, **common), log=quiet)["steps"]
    all_mix = train(TrainConfig(out=str(tmp_path / "d"), cache=tiny_cache, mix_cache=mix_cache, mix=1.0, **common),
                    log=quiet)["steps"]
    assert half in (2 * alone, 2 * alone + 1) and all_mix == only_mix != alone


def test_a_mix_cache_of_another_tokenizer_is_refused(tiny_cache, tmp_path):
    from tests.conftest import build_tiny_model
    from tests.trainer.teacher_cache import write_teacher_cache
    from trainer.errors import TrainError

    tok = tmp_path / "tok"
    from common.tiny import train_tokenizer
    from tests.conftest import shakespeare_text

    train_tokenizer(tok, shakespeare_text(20_000), 300)
    other = write_teacher_cache(str(tmp_path / "other"), build_tiny_model(tmp_path / "m", "gpt2", tok),
                                num_sequences=20)
    with pytest.raises(TrainError, match="was built with another tokenizer than"):
        mixed_run(tiny_cache, other, tmp_path / "x")


@pytest.mark.parametrize("extra,message", [
    pytest.param({"mix": 0.0}, "--mix-cache and --mix go together", id="mix cache without a share"),
    pytest.param({"mix": 1.5}, "--mix is the share of batches drawn from --mix-cache: it must be in [0, 1], got 1.5",
                 id="share above 1"),
])
def test_mix_settings_are_refused_naming_the_flags(tiny_cache, tmp_path, extra, message):
    from typer.testing import CliRunner

    from cli.kdtrain import app

    args = ["run", "--out", str(tmp_path / "o"), "--cache", tiny_cache, "--mix-cache", tiny_cache,
            "--student-from-teacher", "--keep-layers", "1", "--mix", str(extra["mix"])]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "o").exists()
