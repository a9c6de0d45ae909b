"""Model FLOPs utilization (MFU) of a training step: the student's FLOPs per token and the device's peak.

FLOPs of one training step, as PaLM (Chowdhery et al. 2022, appendix B) and nanoGPT's estimate_mfu count
them: forward + backward = 3 x forward, a matmul of an (n x k) by a (k x m) matrix = 2 n k m, so

    per token:  6 N  +  12 * num_layers * hidden_size * T

with N the parameters that take part in a matmul (every parameter except the input embedding tables, which
are lookups; a tied LM head counts once, as the head) and T the length of the sequence the token attends
over (the attention scores and their weighted sum; causal masking is not discounted, as in PaLM). The
trainer sums the attention term per sequence of each batch (a packed row holds several).

Peak: the dense bfloat16 tensor-core rate of the device, from NVIDIA's data sheets, looked up by the name
CUDA reports (PEAK_BF16_TFLOPS); `--peak-tflops` gives it for any other device or precision. Without a peak
(a CPU, an unknown GPU, or a float32 run without --peak-tflops) MFU is logged as null.

Knows model configs and torch's device names; nothing about data or losses.
"""

from __future__ import annotations

import torch

# Dense (no sparsity) bfloat16 tensor-core TFLOP/s per GPU from NVIDIA's data sheets, matched in order against
# torch.cuda.get_device_name(): the first entry whose key is in the name wins (so "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.0), ("H200", 989.0),
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("GH200", 989.0), ("B200", 2250.0), ("B100", 1750.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
)


def matmul_parameters(model) -> int:
    """Parameters that take part in a matmul: all of them but the input embedding tables (a tied head once)."""
    total = sum(p.numel() for p in model.parameters())
    tables = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in tables:  # tied: the table is also the head's matmul
        del tables[id(head.weight)]
    return total - sum(tables.values())


def step_flops(model, sequence_lengths) -> float:
    """FLOPs of one forward + backward over sequences of these lengths (the module docstring's count)."""
    config = model.config
    lengths = [int(n) for n in sequence_lengths]
    dense = 6.0 * matmul_parameters(model) * sum(lengths)
    attention = 12.0 * config.num_hidden_layers * config.hidden_size * sum(n * n for n in lengths)
    return dense + attention


def peak_flops(device: torch.device, bf16: bool, peak_tflops: float | None = None) -> float | None:
    """The device's peak FLOP/s for this run: --peak-tflops if given, else the bf16 data-sheet figure of a
    known CUDA device under --bf16, else None (MFU unknown)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)
