"""trainer/step.py and trainer/throughput.py: how kdtrain's step runs (forward, chunked loss, optimizer, defaults
per device) and the MFU it logs. The chunked path is checked against the full-logits path on a real student."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.reader import CacheReader
from trainer.batch import collate
from trainer.data import cache_index, cache_source
from trainer.metrics import read_metrics
from trainer.run_loss import batch_loss
from trainer.step import (
    CUDA_DATA_WORKERS,
    data_workers,
    loss_chunk_tokens,
    make_optimizer,
    setup_step,
    wants_compile,
)
from trainer.student import HiddenStates, load_student
from trainer.throughput import matmul_parameters, peak_flops, step_flops
from trainer.train import TrainConfig, TrainError, train


@pytest.mark.parametrize("change,message", [
    ({"compile": "fast"}, "--compile must be one of auto, on, off; got 'fast'"),
    ({"data_workers": -1}, r"--data-workers must be >= 0 \(0: read in a thread of the training process\), got -1"),
    ({"peak_tflops": 0.0}, r"--peak-tflops must be a finite number > 0 .*, got 0.0"),
    ({"peak_tflops": float("inf")}, r"--peak-tflops must be a finite number > 0 .*, got inf"),
], ids=["compile", "data-workers", "peak-tflops-zero", "peak-tflops-inf"])
def test_step_settings_refused(tmp_path, change, message):
    with pytest.raises(TrainError, match=message):
        TrainConfig(out=str(tmp_path), cache="c", student="s", **change)


def test_defaults_per_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not wants_compile("auto", cpu) and wants_compile("auto", cuda)
    assert wants_compile("on", cpu) and not wants_compile("off", cuda)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setattr("trainer.step.shared_memory_bytes", lambda: 8 * 2**30)
    assert data_workers(None, cpu) == 0 and data_workers(None, cuda) == CUDA_DATA_WORKERS
    assert data_workers(3, cpu) == 3 and data_workers(0, cuda) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert data_workers(None, cuda) == 1  # never more than the CPUs less one
    monkeypatch.setattr("trainer.step.shared_memory_bytes", lambda: 64 * 2**20)  # a container's default /dev/shm
    assert data_workers(None, cuda) == 0 and data_workers(2, cuda) == 2  # the thread, unless asked
    assert loss_chunk_tokens(50_257, cuda) == 2**30 // (4 * 50_257)  # one float32 (chunk, V) temporary of 1 GiB
    assert loss_chunk_tokens(10, cuda) == 16384 and loss_chunk_tokens(10**8, cuda) == 256
    assert loss_chunk_tokens(50_257, cpu) == 1024


def test_make_optimizer_decays_matrices_only_and_is_not_fused_on_cpu():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1, device=torch.device("cpu"))
    decayed, plain = optimizer.param_groups
    assert [p.dim() for p in decayed["params"]] == [2] and decayed["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    assert not decayed["fused"] and decayed["betas"] == (0.9, 0.95)


def cache_batch(cache: str, count: int = 3):
    reader = CacheReader(cache)
    index = cache_index(reader)
    source = cache_source(reader, index, list(range(len(index))), has_teacher=True)
    seqs = source.read(list(range(count)))
    seqs[1] = {k: v[:40] for k, v in seqs[1].items()}  # a shorter sequence: padding in the batch
    return collate(seqs, True).to("cpu")


@pytest.mark.parametrize("loss", ["fkl", "jsd", "ce"])
def test_chunked_step_loss_equals_the_full_logits_loss(tiny_cache, tiny_gpt2_dir, tmp_path, loss):
    """kdtrain's step on a real student: hidden states + head through linear_kd_loss give the loss and the
    gradients of the model's own logits through sparse_kd_loss / cross-entropy (float32 tolerance)."""
    model = load_student(str(tiny_gpt2_dir)).train()
    torch.nn.init.normal_(model.get_output_embeddings().weight, std=0.2)  # logits far from uniform
    setup = setup_step(model, device=torch.device("cpu"), compile_setting="auto", num_ids=model.config.vocab_size)
    assert isinstance(setup.forward, HiddenStates) and setup.head_weight is not None and not setup.compiled
    batch = cache_batch(tiny_cache)
    config = TrainConfig(out=str(tmp_path), cache="c", student="s", loss=loss, alpha=0.2)
    model.eval()  # no dropout: the two forwards must see the same activations
    grads = []
    for forward, head in ((model, None), (setup.forward, setup.head_weight)):
        model.zero_grad()
        value, stats = batch_loss(forward, batch, config, model.config.vocab_size, head_weight=head, chunk_tokens=37)
        value.backward()
        grads.append((value.detach(), stats["ce"], [p.grad.clone() for p in model.parameters()]))
    (full, full_ce, full_grads), (chunked, chunked_ce, chunked_grads) = grads
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_ce, full_ce, rtol=1e-5, atol=1e-6)
    for a, b in zip(chunked_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_run_logs_mfu_and_peak_memory_and_the_step_it_chose(tiny_cache, tiny_gpt2_dir, tmp_path):
    out = str(tmp_path / "run")
    lines = []
    train(TrainConfig(out=out, cache=tiny_cache, student=str(tiny_gpt2_dir), steps=2, batch_tokens=512,
                      peak_tflops=0.5), log=lines.append)
    assert any("logits from the hidden states chunk by chunk" in line and "packed rows" in line for line in lines)
    steps = [row for row in read_metrics(out) if "tokens_per_s" in row]
    assert len(steps) == 2 and all(0 < row["mfu"] < 1 for row in steps)  # a 0.5 TFLOP/s "peak" on this CPU
    assert all(row["gpu_peak_bytes"] is None for row in steps)  # no GPU
    train(TrainConfig(out=str(tmp_path / "plain"), cache=tiny_cache, student=str(tiny_gpt2_dir), steps=1,
                      batch_tokens=512), log=lambda m: None)
    assert read_metrics(str(tmp_path / "plain"))[0]["mfu"] is None  # no peak known for a CPU


def test_flops_and_peak():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    total = sum(p.numel() for p in model.parameters())
    assert matmul_parameters(model) == total - 32 * 16  # the position table is a lookup; the tied table is the head
    n = matmul_parameters(model)
    assert step_flops(model, [10, 4]) == 6 * n * 14 + 12 * 2 * 16 * (10 * 10 + 4 * 4)
    cpu = torch.device("cpu")
    assert peak_flops(cpu, bf16=True) is None and peak_flops(cpu, bf16=False, peak_tflops=2.0) == 2e12


@pytest.mark.parametrize("name,bf16,expected", [
    ("NVIDIA H200", True, 989e12), ("NVIDIA H100 PCIe", True, 756e12), ("NVIDIA H100 80GB HBM3", True, 989e12),
    ("NVIDIA A100-SXM4-80GB", True, 312e12), ("Some Future GPU", True, None), ("NVIDIA H200", False, None),
])
def test_peak_from_the_device_name(monkeypatch, name, bf16, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), bf16=bf16) == expected


def test_step_flops_of_a_packed_batch_count_each_sequence(tiny_gpt2_dir):
    model = load_student(str(tiny_gpt2_dir))
    seqs = [{"input_ids": np.arange(n) % 50, "loss_mask": np.ones(n, bool)} for n in (5, 7)]
    packed = collate(seqs, False, row_tokens=12)
    assert packed.sequence_lengths == (5, 7)
    assert step_flops(model, packed.sequence_lengths) < step_flops(model, [12])  # not one 12-token sequence
