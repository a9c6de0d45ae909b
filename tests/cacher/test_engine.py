"""cacher/engine.py: build runs any Engine by name and asks nothing else of it.

A stand-in engine whose teacher is a fixed table (each token's next-token distribution depends on that token
only) replaces the hf engine in build's ENGINES; the cache read back holds that table's top K, in score and
generate mode, although the stand-in returns a group's sequences in reverse order.
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import numpy as np
import pytest

from cacher import build as build_module
from cacher.build import BuildConfig, build
from cacher.engine import Engine, EngineSettings, Scored
from cacher.engine_hf import HFEngine
from cacher.engine_vllm_host import VllmEngine
from tests.cacher.test_build import QUIET, read_cache, write_speeches
from tests.conftest import GSM8K


class TableEngine:
    """An Engine whose log-probs for the token after t are log_softmax(table[t])."""

    name = "hf"
    ignored_options: ClassVar[dict[str, str]] = {}
    calls: ClassVar[list] = []

    def __init__(self, model_path: str, settings: EngineSettings):
        self.settings = settings
        rng = np.random.default_rng(0)
        logits = rng.normal(scale=3.0, size=(settings.num_token_ids, settings.num_token_ids))
        self.table = logits - np.log(np.exp(logits).sum(1, keepdims=True))  # (V, V) log-probs

    @staticmethod
    def version() -> str:
        return "table 1"

    def score(self, groups, on_progress):
        k = self.settings.top_k
        for number, group in enumerate(groups):
            TableEngine.calls.append(("score", group.label))
            for position in reversed(range(len(group.sequences))):
                ids = np.asarray(group.sequences[position])
                lp = self.table[ids].astype(np.float32)  # (T, V)
                top = np.argsort(-lp, axis=1, kind="stable")[:, :k]
                topk = np.take_along_axis(lp, top, 1)
                target = np.full(len(ids), np.nan, dtype=np.float32)
                target[:-1] = lp[np.arange(len(ids) - 1), ids[1:]]
                tail = np.log1p(-np.minimum(np.exp(topk.astype(np.float64)).sum(1), 1.0)).astype(np.float32)
                on_progress(1, len(ids))
                yield Scored(number, position, {"topk_ids": top, "topk_logprobs": topk, "target_logprob": target,
                                                "tail_logprob": tail})

    def generate(self, groups):
        for group in groups:
            TableEngine.calls.append(("generate", group.label))
            yield [[np.array([5, 6, 7])] * self.settings.num_samples for _ in group.prompts]

    def close(self) -> None:
        TableEngine.calls.append(("close", ""))


def test_both_engines_have_the_protocol_methods():
    for engine in (HFEngine, VllmEngine, TableEngine):
        for name, member in inspect.getmembers(Engine, inspect.isfunction):
            if name.startswith("_"):
                continue
            assert callable(getattr(engine, name)), (engine, name)
            assert list(inspect.signature(getattr(engine, name)).parameters) == \
                list(inspect.signature(member).parameters), (engine, name)
        assert engine.name in ("hf", "vllm") and isinstance(engine.ignored_options, dict)


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_build_stores_what_any_engine_scores(mode, tiny_gpt2_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(build_module.ENGINES, "hf", TableEngine)
    TableEngine.calls = []
    data = {"dataset": str(write_speeches(tmp_path / "speeches.jsonl"))} if mode == "score" else \
        {"dataset": str(GSM8K), "prompt_field": "question", "response_field": "answer", "mode": "generate"}
    length = 32 if mode == "score" else 200
    result = build(BuildConfig(model=str(tiny_gpt2_dir), max_length=length, limit=6, top_k=4, shard_tokens=2 * length,
                               engine="hf", out=str(tmp_path / "c"), reuse=False, **data), **QUIET)
    reader, sequences = read_cache(tmp_path / "c")
    assert result.status == "built" and reader.manifest.teacher["engine_version"] == "table 1"
    engine = TableEngine("", EngineSettings(dtype="float32", top_k=4, num_token_ids=reader.manifest.vocab_size,
                                            max_length=length))
    for seq in sequences:
        ids = np.asarray(seq["input_ids"])
        want = np.argsort(-engine.table[ids].astype(np.float32), axis=1, kind="stable")[:, :4]
        np.testing.assert_array_equal(seq["topk_ids"], want)
        if mode == "generate":
            assert ids[-3:].tolist() == [5, 6, 7]
    groups = [label for kind, label in TableEngine.calls if kind == "score"]
    assert groups == [f"shard {s}" for s in range(result.num_shards)] and TableEngine.calls[-1] == ("close", "")


def test_the_teacher_loads_in_the_background_and_is_closed_when_not_taken():
    from cacher.engine import EngineError
    from cacher.inputs import TeacherLoader

    settings = EngineSettings(dtype="float32", top_k=2, num_token_ids=8, max_length=8)
    TableEngine.calls = []
    with TeacherLoader(TableEngine, "", settings, early=True) as loader:
        pass  # the build found nothing to do
    assert TableEngine.calls == [("close", "")]
    with TeacherLoader(TableEngine, "", settings, early=True) as loader:
        assert isinstance(loader.get(), TableEngine) and loader.seconds >= 0
    assert TableEngine.calls == [("close", "")]  # a taken engine is the caller's to close

    def broken(folder, settings):
        raise EngineError("the weights are damaged")

    with TeacherLoader(broken, "", settings, early=True):
        pass  # an error nobody asked for stays quiet (the build's own error, if any, is the one raised)
    with pytest.raises(EngineError, match="damaged"), TeacherLoader(broken, "", settings, early=False) as loader:
        loader.get()


def test_an_already_built_cache_loads_no_teacher(tiny_gpt2_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(build_module.ENGINES, "hf", TableEngine)
    config = BuildConfig(model=str(tiny_gpt2_dir), dataset=str(write_speeches(tmp_path / "s.jsonl")), max_length=32,
                         limit=3, top_k=4, engine="hf", out=str(tmp_path / "c"), reuse=False)
    assert build(config, **QUIET).status == "built"
    made = []

    class Recorded:
        version = staticmethod(TableEngine.version)
        ignored_options: ClassVar[dict[str, str]] = {}

        def __init__(self, *args):
            made.append(args)

    monkeypatch.setitem(build_module.ENGINES, "hf", Recorded)
    assert build(config, **QUIET).status == "already built" and made == []
