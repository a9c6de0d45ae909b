"""Make the tiny teacher of examples/tiny_chain.yaml: a 4-layer GPT-2 trained briefly on tiny Shakespeare.

Run from the repository root:  .venv/bin/python examples/make_tiny_teacher.py examples/tiny-teacher
It trains a byte-level BPE tokenizer on the spot (nothing is downloaded), builds a random 4-layer,
128-wide GPT-2, and trains it with `kdtrain run --loss ce` (kdcache's own trainer, plain
cross-entropy, no cache) for --steps steps, so the teacher is really better than a random student.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import SHAKESPEARE, build_tiny_model, train_tokenizer
from trainer.train import TrainConfig, train


def make_tiny_teacher(out: str, *, steps: int = 150, num_layers: int = 4, seed: int = 0, log=print) -> str:
    if os.path.exists(os.path.join(out, "model.safetensors")):
        log(f"{out} already holds a model; delete it to rebuild")
        return out
    with tempfile.TemporaryDirectory(prefix="tiny-teacher-") as work:
        tok = Path(work) / "tokenizer"
        train_tokenizer(tok, vocab_size=512)
        init = build_tiny_model(Path(work) / "init", "gpt2", tok, num_layers=num_layers, seed=seed, width=128)
        staging = out + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        train(TrainConfig(out=staging, dataset=str(SHAKESPEARE), student=str(init), loss="ce", steps=steps, lr=3e-3,
                          warmup_steps=10, batch_tokens=4096, max_length=128, seed=seed, overwrite=True), log=log)
        for name in os.listdir(staging):
            if name in ("checkpoints",):
                shutil.rmtree(os.path.join(staging, name))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staging, out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(REPO / "examples" / "tiny-teacher"))
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    print(make_tiny_teacher(args.out, steps=args.steps))
