"""trainer/student.py: layer-dropped students of tiny 4-layer teachers, config students, tokenizer checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.tokenizers import tokenizer_of, vocab_fingerprint
from tests.conftest import build_tiny_model, train_tokenizer
from trainer.student import (
    check_tokenizer_matches,
    drop_layers,
    kept_layer_indices,
    load_student,
    save_student,
    student_from_config,
    student_from_teacher,
)

LAYER_LISTS = {"gpt2": "transformer.h", "llama": "model.layers"}


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    return {
        family: build_tiny_model(
            tmp_path_factory.mktemp(f"{family}-4"), family, tiny_tokenizer_dir, num_layers=4
        )
        for family in LAYER_LISTS
    }


def layer_state(model, family: str, index: int) -> dict[str, torch.Tensor]:
    return model.get_submodule(LAYER_LISTS[family])[index].state_dict()


def prompt_ids(tokenizer_dir) -> torch.Tensor:
    tokenizer = tokenizer_of(str(tokenizer_dir))
    return tokenizer("To be, or not to be", return_tensors="pt")["input_ids"]


@pytest.mark.parametrize(
    "num_layers, keep_layers, expected",
    [
        (4, 2, [0, 3]),
        (4, 3, [0, 2, 3]),
        (4, 4, [0, 1, 2, 3]),
        (4, 1, [0]),
        (30, 4, [0, 10, 19, 29]),
        (30, 30, list(range(30))),
    ],
)
def test_kept_layers_are_evenly_spaced_with_first_and_last(num_layers, keep_layers, expected):
    assert kept_layer_indices(num_layers, keep_layers) == expected


@pytest.mark.parametrize("keep_layers", [0, -1, 5])
def test_bad_keep_layers_is_refused(teacher_dirs, keep_layers):
    with pytest.raises(ValueError, match=rf"keep_layers={keep_layers} but the teacher has 4 layers"):
        student_from_teacher(str(teacher_dirs["llama"]), keep_layers)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layer_dropped_student_copies_the_chosen_layers(teacher_dirs, tiny_tokenizer_dir, family):
    teacher = load_student(str(teacher_dirs[family])).eval()
    student = student_from_teacher(str(teacher_dirs[family]), keep_layers=2).eval()

    assert len(student.get_submodule(LAYER_LISTS[family])) == 2
    assert student.config.num_hidden_layers == 2
    for new_idx, old_idx in enumerate([0, 3]):
        expected = layer_state(teacher, family, old_idx)
        got = layer_state(student, family, new_idx)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        layer = student.get_submodule(LAYER_LISTS[family])[new_idx]
        assert {m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")} == {new_idx}
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert torch.equal(student.get_output_embeddings().weight, teacher.get_output_embeddings().weight)

    ids = prompt_ids(tiny_tokenizer_dir)
    with torch.no_grad():
        logits = student(ids).logits
    assert logits.shape == (1, ids.shape[1], student.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layer_dropped_student_generates_the_same_with_and_without_kv_cache(
    teacher_dirs, tiny_tokenizer_dir, family
):
    # A kept layer still numbered 3 in a 2-layer student would index past the cache (or share a slot).
    student = student_from_teacher(str(teacher_dirs[family]), keep_layers=2).eval()
    ids = prompt_ids(tiny_tokenizer_dir)
    kwargs = {
        "max_new_tokens": 5,
        "min_new_tokens": 5,
        "do_sample": False,
        "pad_token_id": student.config.eos_token_id,
    }
    with_cache = student.generate(ids, use_cache=True, **kwargs)
    without_cache = student.generate(ids, use_cache=False, **kwargs)
    assert with_cache.shape == (1, ids.shape[1] + 5)
    assert torch.equal(with_cache, without_cache)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_keeping_every_layer_gives_the_teacher(teacher_dirs, tiny_tokenizer_dir, family):
    teacher = load_student(str(teacher_dirs[family])).eval()
    student = student_from_teacher(str(teacher_dirs[family]), keep_layers=4).eval()
    ids = prompt_ids(tiny_tokenizer_dir)
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)


def test_qwen2_with_sliding_layers_keeps_layer_types():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    )
    model = Qwen2ForCausalLM(config).eval()
    assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    drop_layers(model, 2)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    ids = torch.randint(0, 64, (1, 6))
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(
        model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs)
    )


def test_unsupported_architecture_is_named():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(
        OPTConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    )
    with pytest.raises(ValueError, match=r"'opt' model .*supported model types: gpt2, llama"):
        drop_layers(model, 1)


def test_saved_student_is_a_plain_hf_folder(teacher_dirs, tiny_tokenizer_dir, tmp_path):
    student = student_from_teacher(str(teacher_dirs["llama"]), keep_layers=2).eval()
    tokenizer = tokenizer_of(str(tiny_tokenizer_dir))
    out = save_student(student, tokenizer, tmp_path / "student")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    reloaded = load_student(str(out)).eval()
    assert reloaded.config.num_hidden_layers == 2
    ids = prompt_ids(tiny_tokenizer_dir)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, student(ids).logits)
    assert vocab_fingerprint(tokenizer_of(str(out))) == vocab_fingerprint(tokenizer)


def test_load_student_in_bfloat16(teacher_dirs):
    assert load_student(str(teacher_dirs["gpt2"]), "bfloat16").dtype == torch.bfloat16


def test_missing_hub_id_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match="is not a local folder and could not be fetched from the Hugging Face hub"
    ):
        load_student("kdcache-tests/no-such-student")


def test_student_from_config(tmp_path):
    config_file = tmp_path / "student.json"
    config_file.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 10,
            }
        )
    )
    model = student_from_config(config_file, vocab_size=400)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.get_input_embeddings().num_embeddings == 400
    assert model.config.num_hidden_layers == 2
    assert model(torch.randint(0, 400, (1, 5))).logits.shape == (1, 5, 400)


def test_student_config_errors(tmp_path):
    no_type = tmp_path / "no-type.json"
    no_type.write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(ValueError, match='has no "model_type"'):
        student_from_config(no_type, vocab_size=10)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ValueError, match="no-such-architecture"):
        student_from_config(unknown, vocab_size=10)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        student_from_config(tmp_path / "missing.json", vocab_size=10)


def test_check_tokenizer_matches(tiny_tokenizer_dir, tmp_path):
    tokenizer = tokenizer_of(str(tiny_tokenizer_dir))
    expected = vocab_fingerprint(tokenizer)
    size = len(tokenizer)
    check_tokenizer_matches(tokenizer, expected, size, num_student_embeddings=size)
    check_tokenizer_matches(tokenizer, expected, size, num_student_embeddings=size + 64)  # padded: fine
    with pytest.raises(
        ValueError, match=rf"'small' has {size - 1} embedding rows but teacher 'smollm2' emits {size}"
    ):
        check_tokenizer_matches(
            tokenizer,
            expected,
            size,
            num_student_embeddings=size - 1,
            student_name="small",
            teacher_name="smollm2",
        )
    other = train_tokenizer(tmp_path, vocab_size=300)
    with pytest.raises(
        ValueError, match=r"tokenizer of student 'other'.*differs from that of teacher 'smollm2'"
    ):
        check_tokenizer_matches(other, expected, size, student_name="other", teacher_name="smollm2")


def test_cache_token_ids_and_a_student_with_fewer_rows(tiny_tokenizer_dir):
    """A cache's token ids are its vocab_size, the tokenizer's size (storage_layout.md 3; a cache of an older format
    that recorded a padded teacher's rows is refused when it is opened): a student needs that many embedding rows,
    more (a padded matrix) is fine."""
    from trainer.student import cache_token_ids

    assert cache_token_ids({"vocab_size": 384, "tokenizer_size": 384}) == 384
    assert cache_token_ids({"vocab_size": 384}) == 384
    tokenizer = tokenizer_of(str(tiny_tokenizer_dir))
    expected = vocab_fingerprint(tokenizer)
    check_tokenizer_matches(tokenizer, expected, 384, num_student_embeddings=400)
    with pytest.raises(ValueError, match=r"380 embedding rows but teacher 'teacher' emits 384 token ids"):
        check_tokenizer_matches(tokenizer, expected, 384, num_student_embeddings=380)


# ---------------------------------------------------------------------------------------------
# What the training step relies on: a plain linear head, packed sequences kept apart


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_plain_heads_are_found_and_keep_packed_sequences_apart(teacher_dirs, family):
    from trainer.student import HiddenStates, linear_head_weight, packs_sequences

    model = load_student(str(teacher_dirs[family])).train()
    weight = linear_head_weight(model)
    assert weight is model.get_output_embeddings().weight and model.training  # the probe leaves the mode as it was
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(HiddenStates(model)(input_ids=ids) @ weight.T, model(input_ids=ids).logits)
    assert packs_sequences(model)


def test_heads_that_are_not_plain_or_ignore_positions_are_not_relied_on(teacher_dirs):
    from transformers import GPT2LMHeadModel

    from trainer.student import linear_head_weight, packs_sequences

    class Scaled(GPT2LMHeadModel):  # logits scaled after the head: hidden @ W.T is not the logits
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    class NoPositions(GPT2LMHeadModel):  # drops position_ids: packed sequences would attend across each other
        def forward(self, *args, position_ids=None, **kwargs):
            return super().forward(*args, **kwargs)

    folder = str(teacher_dirs["gpt2"])
    assert linear_head_weight(Scaled.from_pretrained(folder)) is None
    biased = load_student(folder)
    head = biased.get_output_embeddings()
    biased.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    assert linear_head_weight(biased) is None
    assert linear_head_weight(NoPositions.from_pretrained(folder)) is not None
    assert not packs_sequences(NoPositions.from_pretrained(folder))
