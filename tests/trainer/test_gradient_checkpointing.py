"""Gradient checkpointing (`kdtrain run --gradient-checkpointing`): the same loss and gradients as without it, on the
hidden-state loss path the trainer uses (HiddenStates + linear_kd_loss) and on full logits, with dropout on; and it
really recomputes (each layer runs twice per step)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.losses import LossOptions, linear_kd_loss
from trainer.student import HiddenStates, enable_gradient_checkpointing, linear_head_weight

B, L, K = 2, 24, 8


def student(folder, dropout: float):
    """A tiny student in train mode with dropout on wherever its config has it."""
    config_overrides = {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout, "attention_dropout": dropout}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for key, value in config_overrides.items():
        if hasattr(model.config, key):
            setattr(model.config, key, value)
    model = AutoModelForCausalLM.from_pretrained(folder, config=model.config, dtype=torch.float32)
    return model.train()


def teacher_rows(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B * L, vocab, generator=g) * 3
    logprobs = torch.log_softmax(logits, -1)
    top_lp, top_ids = logprobs.topk(K, dim=-1)  # (N, K)
    tail = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1 - 1e-6))  # (N,)
    return top_ids, top_lp, tail


def step(model, ids, rows, hidden_path: bool):
    """Loss and {name: grad} of one forward/backward as the trainer's step makes it."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout draws for both runs
    targets = torch.roll(ids, -1, dims=1).reshape(-1)
    mask = torch.ones(B * L, dtype=torch.bool)
    mask[L - 1 :: L] = False  # the last token of each row predicts nothing
    options = LossOptions(loss="fkl", alpha=0.2)
    if hidden_path:
        head = linear_head_weight(model)
        assert head is not None  # the trainer's path for a plain linear head
        hidden = HiddenStates(model)(input_ids=ids)  # (B, L, H)
        loss, _ = linear_kd_loss(hidden.reshape(B * L, -1), head, *rows, targets, mask, options, chunk_tokens=16)
    else:
        logits = model(input_ids=ids, use_cache=False).logits  # (B, L, V)
        from trainer.losses import sparse_kd_loss

        loss, _ = sparse_kd_loss(logits.reshape(B * L, -1), *rows, targets, mask, options)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("hidden_path", [True, False])
def test_same_loss_and_gradients_with_checkpointing(arch, hidden_path, tiny_gpt2_dir, tiny_llama_dir):
    plain = student(tiny_gpt2_dir if arch == "gpt2" else tiny_llama_dir, dropout=0.1)
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed)
    vocab = plain.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(1))
    rows = teacher_rows(vocab)
    loss, grads = step(plain, ids, rows, hidden_path)
    loss_ckpt, grads_ckpt = step(checkpointed, ids, rows, hidden_path)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads.keys() and len(grads) == len(list(plain.parameters()))
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # with dropout on, the runs differ unless the recompute replays the dropout masks: the test would catch that
    torch.manual_seed(7)
    other = HiddenStates(plain)(input_ids=ids)
    torch.manual_seed(8)
    assert not torch.equal(other, HiddenStates(plain)(input_ids=ids))


def test_each_layer_is_recomputed_in_the_backward(tiny_gpt2_dir):
    model = student(tiny_gpt2_dir, dropout=0.0)
    enable_gradient_checkpointing(model)
    calls = []
    layer = model.transformer.h[0]
    layer.register_forward_pre_hook(lambda module, args: calls.append(1))  # the recompute stops early: no post hook
    ids = torch.randint(0, 100, (B, L))
    HiddenStates(model)(input_ids=ids).sum().backward()
    assert len(calls) == 2  # the forward, then its recompute during backward
    model.eval()  # evaluation runs once, under no_grad or not
    calls.clear()
    with torch.no_grad():
        HiddenStates(model)(input_ids=ids)
    assert len(calls) == 1


def test_a_model_without_support_is_refused(tiny_gpt2_dir, monkeypatch):
    model = student(tiny_gpt2_dir, dropout=0.0)
    monkeypatch.setattr(type(model), "supports_gradient_checkpointing", False)
    with pytest.raises(ValueError, match=r"\(GPT2LMHeadModel\) does not support gradient checkpointing"):
        enable_gradient_checkpointing(model)


def run_args(tiny_cache, teacher, out):
    return ["run", "--cache", tiny_cache, "--student-from-teacher", "--keep-layers", "1", "--teacher", str(teacher),
            "--steps", "3", "--batch-tokens", "256", "--eval-every", "3", "--out", str(out)]


def test_kdtrain_run_with_checkpointing_trains_the_same(tmp_path, tiny_cache, tiny_gpt2_dir):
    """The whole step through `kdtrain run`: every logged loss, gradient norm and held-out number is the same."""
    from typer.testing import CliRunner

    from cli.kdtrain import app
    from trainer.metrics import read_metrics

    runner = CliRunner()
    plain = runner.invoke(app, run_args(tiny_cache, tiny_gpt2_dir, tmp_path / "plain"))
    checkpointed = runner.invoke(app, [*run_args(tiny_cache, tiny_gpt2_dir, tmp_path / "ckpt"), "--gradient-checkpointing"])
    assert plain.exit_code == 0 and checkpointed.exit_code == 0, (plain.output, checkpointed.output)
    assert "logits from the hidden states chunk by chunk, gradient checkpointing" in " ".join(checkpointed.output.split())
    rows, rows_ckpt = read_metrics(str(tmp_path / "plain")), read_metrics(str(tmp_path / "ckpt"))
    keys = ("loss", "ce", "kd", "grad_norm", "eval_loss", "eval_kl", "eval_ppl")
    assert len(rows) == len(rows_ckpt) and any("eval_kl" in r for r in rows)
    for row, row_ckpt in zip(rows, rows_ckpt, strict=True):
        for key in keys:
            if key in row:
                assert row_ckpt[key] == pytest.approx(row[key], rel=1e-5, abs=1e-7), (row["step"], key)


def test_kdtrain_run_refuses_checkpointing_a_model_without_support(tmp_path, tiny_cache, tiny_gpt2_dir, monkeypatch):
    from transformers import GPT2LMHeadModel
    from typer.testing import CliRunner

    from cli.kdtrain import app

    monkeypatch.setattr(GPT2LMHeadModel, "supports_gradient_checkpointing", False)
    res = CliRunner().invoke(app, [*run_args(tiny_cache, tiny_gpt2_dir, tmp_path / "out"), "--gradient-checkpointing"])
    assert res.exit_code == 2
    message = " ".join(res.output.split())
    assert "--gradient-checkpointing: the student (GPT2LMHeadModel) does not support gradient checkpointing" in message
    assert "train without it" in message
