"""Checkpoints: everything a run needs to continue bit for bit, written atomically.

`<out>/checkpoints/step-NNNNNN/` holds:
- `model.safetensors` (+ config.json): the student's weights (save_pretrained, safetensors);
- `optimizer.pt`: optimizer and scheduler state dicts and torch's RNG state, only tensors and plain
  containers, loaded with `torch.load(weights_only=True)` (no pickle of arbitrary objects);
- `state.json`: step, the data cursor of every rank, numpy's and Python's RNG states.
A checkpoint is written into a temporary folder and renamed into place; the last `keep` stay.

Knows torch and safetensors; nothing about the cache or the losses.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

STATE_FILE = "state.json"


def checkpoint_dir(out: str, step: int) -> str:
    return os.path.join(out, "checkpoints", f"step-{step:06d}")


def latest_checkpoint(out: str) -> str | None:
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return None
    done = sorted(d for d in os.listdir(root) if d.startswith("step-") and os.path.exists(os.path.join(root, d, STATE_FILE)))
    return os.path.join(root, done[-1]) if done else None


def save_checkpoint(out: str, step: int, model, optimizer, scheduler, cursors: list[dict], extra: dict | None = None,
                    keep: int = 2) -> str:
    final = checkpoint_dir(out, step)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, os.path.join(tmp, "optimizer.pt"))
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "step": step,
        "cursors": cursors,
        "numpy_rng": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
        **(extra or {}),
    }
    with open(os.path.join(tmp, STATE_FILE), "w") as f:
        json.dump(state, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    root = os.path.dirname(final)
    old = sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp"))
    for d in old[:-keep]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return final


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG states; returns state.json's dict."""
    from safetensors.torch import load_model

    weights = os.path.join(path, "model.safetensors")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"checkpoint {path} has no model.safetensors; delete it to fall back to an older one")
    load_model(model, weights, strict=False)
    blob = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True, map_location="cpu")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    n = state["numpy_rng"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python_rng"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    return state
