"""Checkpoints: everything a run needs to continue bit for bit, written atomically.

`<out>/checkpoints/step-NNNNNN/` holds:
- `model.safetensors` + `config.json`: the student's weights (save_pretrained, safetensors);
- `optimizer.pt`: the optimizer's and the scheduler's state dicts and torch's RNG states (CPU, and
  CUDA when present): only tensors and plain containers, loaded with `torch.load(weights_only=True)`;
- `state.json`: a small JSON dict: `step`, `cursors` (the data cursor `{"epoch", "position"}` of each
  rank), numpy's and Python's RNG states, and what the caller passes besides (the trainer: the settings
  the data order depends on, `data`, those the optimization depends on, `train`, and `schedule_steps`).
Loading refuses weights that do not fit the model key for key and shape for shape (another architecture).
A checkpoint is written into `.tmp-step-NNNNNN/` and renamed into place, so a folder named `step-*`
is always complete; the last `keep` stay. Symbolic links are never followed: a `step-*` that is a link
is not a checkpoint, and a link in the way of a write is removed, not written through.

Knows torch and safetensors; nothing about the cache, the losses or the loop.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

STATE_FILE = "state.json"
CHECKPOINTS_DIR = "checkpoints"


def checkpoint_dir(out: str, step: int) -> str:
    return os.path.join(out, CHECKPOINTS_DIR, f"step-{step:06d}")


def list_checkpoints(out: str) -> list[str]:
    """Complete checkpoints, oldest first (links are not checkpoints)."""
    root = os.path.join(out, CHECKPOINTS_DIR)
    if not os.path.isdir(root) or os.path.islink(root):
        return []
    names = sorted(d for d in os.listdir(root) if d.startswith("step-") and not os.path.islink(os.path.join(root, d))
                   and os.path.exists(os.path.join(root, d, STATE_FILE)))
    return [os.path.join(root, d) for d in names]


def _clear(path: str) -> None:
    """Remove what is at path: a link itself (never its target), or a folder tree."""
    if os.path.islink(path):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(out: str) -> str | None:
    done = list_checkpoints(out)
    return done[-1] if done else None


def save_checkpoint(out: str, step: int, model, optimizer, scheduler, state: dict, keep: int = 2) -> str:
    """Write checkpoint `step` (state: JSON-able, e.g. cursors and data settings); keep the last `keep`."""
    final = checkpoint_dir(out, step)
    tmp = os.path.join(os.path.dirname(final), ".tmp-" + os.path.basename(final))
    _clear(tmp)
    os.makedirs(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    rng = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **rng},
               os.path.join(tmp, "optimizer.pt"))
    np_state = np.random.get_state()
    py_state = random.getstate()
    body = {
        "step": step,
        **state,
        "numpy_rng": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
    }
    with open(os.path.join(tmp, STATE_FILE), "w") as f:
        json.dump(body, f)
    _clear(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def _check_weights_fit(path: str, weights: str, model) -> None:
    """Raise ValueError naming the keys and shapes where the checkpoint's weights and the model's differ.

    Weights the model ties (one tensor under two names) are stored once, under either name.
    """
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    wanted = model.state_dict()
    names_of: dict[tuple, list[str]] = {}  # one entry per tensor (tied names share it)
    for name, tensor in wanted.items():
        names_of.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    missing = [names[0] for names in names_of.values() if not any(n in stored for n in names)]
    unexpected = sorted(set(stored) - set(wanted))
    shapes = [f"{k} {list(stored[k])} (model {list(wanted[k].shape)})" for k in stored
              if k in wanted and stored[k] != tuple(wanted[k].shape)]

    def some(names: list[str]) -> str:
        return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")

    problems = ([f"missing {some(sorted(missing))}"] if missing else []) + (
        [f"unexpected {some(unexpected)}"] if unexpected else []) + ([f"other shapes: {some(shapes)}"] if shapes else [])
    if problems:
        raise ValueError(f"checkpoint {path} holds the weights of another architecture than this student's "
                         f"({'; '.join(problems)})")


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG states; returns state.json's dict.

    Raises ValueError, before changing anything, when the weights do not fit the model (_check_weights_fit).
    """
    from safetensors.torch import load_model

    weights = os.path.join(path, "model.safetensors")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"checkpoint {path} has no model.safetensors; delete it to fall back to an older one")
    _check_weights_fit(path, weights, model)
    load_model(model, weights, strict=True)  # tied weights are stored once; load_model knows that
    blob = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True, map_location="cpu")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    if "cuda_rng" in blob and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    state = read_state(path)
    n = state["numpy_rng"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python_rng"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    return state
