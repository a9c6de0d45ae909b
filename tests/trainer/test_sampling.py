"""trainer/sampling.py: seeded per-response sampling in padded batches, stop tokens, padded rows never drawn."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.templates import prompt_only_ids
from trainer.sampling import sample_responses, sample_seed, stop_ids

PROMPTS = ["First Citizen: we are", "O", "Romeo, Romeo, wherefore art thou", "KING"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_and_tokenizer(request, tiny_gpt2_dir, tiny_llama_dir):
    folder = tiny_gpt2_dir if request.param == "gpt2" else tiny_llama_dir
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_greedy_in_a_left_padded_batch_equals_generate_alone(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    got = sample_responses(model, prompts, [1, 2, 3, 4], [10] * 4, temperature=0, stops=set(), pad_id=0,
                           batch_size=4)
    for p, (ids, finished) in zip(prompts, got):
        alone = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(p):]
        assert ids == alone.tolist() and not finished


def test_a_response_depends_on_its_seed_not_on_its_batch(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    seeds = [sample_seed(0, 1, i, 0) for i in range(len(prompts))]
    together = sample_responses(model, prompts, seeds, [12] * 4, temperature=1.0, stops=set(), pad_id=0, batch_size=4)
    alone = sample_responses(model, prompts, seeds, [12] * 4, temperature=1.0, stops=set(), pad_id=0, batch_size=1)
    reversed_ = sample_responses(model, prompts[::-1], seeds[::-1], [12] * 4, temperature=1.0, stops=set(), pad_id=0,
                                 batch_size=3)
    assert together == alone == reversed_[::-1]
    other = sample_responses(model, prompts, [s + 1 for s in seeds], [12] * 4, temperature=1.0, stops=set(),
                             pad_id=0, batch_size=4)
    assert other != together  # another seed, other draws (12 tokens of a 384-id vocabulary)


def test_sample_seed_is_a_pure_function_of_its_parts():
    assert sample_seed(0, 1, 2, 3) == sample_seed(0, 1, 2, 3)
    assert len({sample_seed(0, r, p, k) for r in range(3) for p in range(3) for k in range(3)}) == 27
    assert 0 <= sample_seed(2**40, 7) < 2**63


def test_chat_stop_tokens_end_the_turn_and_are_kept(tiny_gpt2_dir):
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_ids(tok, "chat") == {tok.eos_token_id, end}
    assert stop_ids(tok, "plain") == {tok.eos_token_id}
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    def favour_end(module, inputs, logits):  # <|im_end|> by far the likeliest next token everywhere
        logits[..., end] += 1e4
        return logits

    model.lm_head.register_forward_hook(favour_end)
    prompt = prompt_only_ids(tok, "Who are you?", "chat")
    [(ids, finished)] = sample_responses(model, [prompt], [0], [20], temperature=1.0, stops=stop_ids(tok, "chat"),
                                         pad_id=0)
    assert finished and ids[-1] == end and end not in ids[:-1]


def test_budget_ends_a_response_unfinished(tiny_gpt2_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    [(ids, finished)] = sample_responses(model, [[5, 6, 7]], [0], [3], temperature=1.0, stops=set(), pad_id=0)
    assert len(ids) == 3 and not finished


def test_padded_logit_rows_are_never_sampled(tiny_tokenizer_dir, tmp_path):
    from tests.conftest import build_tiny_model

    folder = build_tiny_model(tmp_path / "m", "llama", tiny_tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    num_ids = model.config.vocab_size
    model.resize_token_embeddings(num_ids + 8)
    def favour_padding(module, inputs, logits):  # the 8 padded rows would win every draw if they could be drawn
        logits[..., num_ids:] += 1e4
        return logits

    model.lm_head.register_forward_hook(favour_padding)
    got = sample_responses(model, [[5, 6, 7], [9]], [1, 2], [16, 16], temperature=1.0, stops=set(), pad_id=0,
                           num_ids=num_ids)
    assert all(max(ids) < num_ids for ids, _ in got)
    unrestricted = sample_responses(model, [[5, 6, 7]], [1], [4], temperature=1.0, stops=set(), pad_id=0)
    assert max(unrestricted[0][0]) >= num_ids  # the test would see a padded row drawn
