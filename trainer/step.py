"""How `kdtrain run`'s step runs on its device: the student's forward, the optimizer, the data layout, MFU.

- Forward: a student whose logits are `hidden_states @ head.weight.T` (trainer.student.linear_head_weight)
  runs without its head (trainer.student.HiddenStates) and the loss makes the logits chunk by chunk from
  the hidden states and the head's weight (trainer.losses.linear_kd_loss), so the (tokens x vocabulary)
  logits never exist; any other student returns its logits as before. The forward is wrapped in DDP under
  torchrun, then in torch.compile where it pays: on CUDA by default (`--compile auto`), never on a CPU
  unless asked (`--compile on`; measured slower there for these students, BENCHMARKS.md P1).
- Optimizer: AdamW (betas 0.9/0.95, weight decay on matrices only), the fused CUDA kernel on a GPU.
- Data layout: sequences packed into rows of the longest sequence's length (trainer/batch.py) when
  `--pack` and the student keeps packed sequences apart (trainer.student.packs_sequences); else padded rows.
- MFU per logged step: trainer/throughput.py.

Knows torch, the student checks and the loss's chunking; nothing about caches or the loop itself.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.student import HiddenStates, linear_head_weight, packs_sequences

# On CUDA, bytes of one float32 (chunk_tokens, V) temporary of the chunked loss (a few live at once): large chunks
# keep the per-chunk host synchronization and kernel launches small next to the work. On a CPU, the chunk
# size sparse_kd_loss has always used (BENCHMARKS.md P1).
LOSS_CHUNK_BYTES = 2**30
CPU_CHUNK_TOKENS = 1024
# Worker processes of the data path on a CUDA machine by default (at most the CPUs less one), if /dev/shm has
# MIN_SHARED_MEMORY free: each batch crosses from a worker through shared memory (a container's default 64 MiB
# /dev/shm would kill the workers), else the one reading thread.
CUDA_DATA_WORKERS = 4
MIN_SHARED_MEMORY = 2 * 2**30


@dataclass
class StepSetup:
    """What the loop calls: forward(**batch.model_inputs()) gives logits (head_weight None) or hidden states."""

    forward: torch.nn.Module
    head_weight: torch.nn.Parameter | None
    chunk_tokens: int
    compiled: bool


def wants_compile(setting: str, device: torch.device) -> bool:
    """--compile auto|on|off: auto compiles on CUDA only."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def loss_chunk_tokens(num_ids: int, device: torch.device) -> int:
    """Tokens per chunk of the chunked loss: on CUDA one float32 (chunk, V) temporary of about LOSS_CHUNK_BYTES."""
    if device.type != "cuda":
        return CPU_CHUNK_TOKENS
    return max(256, min(16384, LOSS_CHUNK_BYTES // (4 * num_ids)))


def setup_step(model, *, device: torch.device, compile_setting: str, num_ids: int,
               wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> StepSetup:
    """The student's forward for the step (see the module docstring); model is on device, in train mode.

    wrap: DistributedDataParallel's wrapper under torchrun (applied before torch.compile), or None.
    """
    head = linear_head_weight(model)
    forward = model if head is None else HiddenStates(model)
    if wrap is not None:
        forward = wrap(forward)
    compiled = wants_compile(compile_setting, device)
    if compiled:
        # A student torch.compile cannot compile runs eagerly (with dynamo's warning) instead of failing the run.
        torch._dynamo.config.suppress_errors = True
        forward = torch.compile(forward)
    return StepSetup(forward, head, loss_chunk_tokens(num_ids, device), compiled)


def packing_row_tokens(model, pack: bool, lengths) -> int | None:
    """Row length of packed batches (the longest sequence), or None for padded rows (no --pack, or a student
    that does not keep packed sequences apart)."""
    if not pack or len(lengths) == 0 or not packs_sequences(model):
        return None
    return int(max(lengths))


def data_workers(setting: int | None, device: torch.device) -> int:
    """--data-workers, default CUDA_DATA_WORKERS processes on CUDA (at most the CPUs less one; none without
    MIN_SHARED_MEMORY free in /dev/shm), 0 on a CPU."""
    if setting is not None:
        return setting
    if device.type != "cuda" or shared_memory_bytes() < MIN_SHARED_MEMORY:
        return 0
    return min(CUDA_DATA_WORKERS, max(0, (os.cpu_count() or 1) - 1))


def shared_memory_bytes(path: str = "/dev/shm") -> int:
    """Free bytes where worker processes hand batches over (0 where there is no such folder)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def make_optimizer(model, *, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on matrices only; fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda" or None)
