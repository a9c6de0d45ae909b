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
- Processes: under torchrun rank r of a node runs on cuda:LOCAL_RANK (`select_device`) and joins the process
  group (nccl on CUDA, gloo on a CPU); the ranks agree on whether a step's loss and gradient are finite.

Knows torch, the student checks and the loss's chunking; nothing about caches or the loop itself.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.errors import TrainError
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


def select_device(env, *, cuda_available: bool, num_cuda_devices: int) -> torch.device:
    """This process's device: cuda:LOCAL_RANK on a CUDA machine (torchrun sets LOCAL_RANK; alone it is 0), else cpu.

    env: the environment (os.environ). A pure function of its arguments, so tests can call it directly.
    """
    if not cuda_available:
        return torch.device("cpu")
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if not 0 <= local_rank < num_cuda_devices:
        raise TrainError(f"LOCAL_RANK={local_rank} but this machine shows {num_cuda_devices} CUDA device(s), so that "
                         f"rank has no GPU of its own: start at most {num_cuda_devices} processes per node "
                         "(torchrun --nproc_per_node) or check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", local_rank)


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); binds the process to its GPU, then joins the process group under torchrun."""
    device = select_device(os.environ, cuda_available=torch.cuda.is_available(),
                           num_cuda_devices=torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: nccl uses the current device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world, device


def ddp(model, device: torch.device):
    """The model wrapped in DistributedDataParallel, on its own GPU on CUDA (else every rank would use cuda:0)."""
    if device.type == "cuda":
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
    return torch.nn.parallel.DistributedDataParallel(model)


def no_sync(forward):
    """DDP's no_sync() of the step's forward, through a torch.compile wrapper if there is one."""
    return getattr(forward, "_orig_mod", forward).no_sync()


def gpu_peak_bytes(device: torch.device) -> int | None:
    """Peak GPU memory allocated since the previous call (None on a CPU); resets the peak."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def nonfinite_step(loss: float, grad_norm: float, world: int, device: torch.device) -> str | None:
    """Why a step must not be applied (its loss or gradient norm is not finite), else None; all ranks agree."""
    bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if world > 1:
        flag = torch.tensor([float(bad)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        bad = bool(flag.item())
    return f"loss {loss:.6g}, gradient norm {grad_norm:.6g} (not finite on this or another rank)" if bad else None
