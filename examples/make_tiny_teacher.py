"""Make the tiny teacher of examples/tiny_chain.yaml: a 4-layer GPT-2 trained briefly on tiny Shakespeare.

Run from the repository root:  .venv/bin/python examples/make_tiny_teacher.py examples/tiny-teacher
It trains a byte-level BPE tokenizer on the spot (common.tiny; nothing is downloaded), builds a random
4-layer, 128-wide GPT-2, and trains it with `kdtrain run --loss ce` (kdcache's own trainer, plain
cross-entropy, no cache) for --steps steps, so the teacher is really better than a random student.
The text is the repository's data/shakespeare.txt (data/README.md), or --text PATH; nothing outside the
checkout is needed.
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

from common.tiny import build_tiny_model, train_tokenizer
from trainer.train import TrainConfig, train

TEXT = REPO / "data" / "shakespeare.txt"
VOCAB_SIZE = 512
TOKENIZER_CHARS = 200_000  # the tokenizer is trained on the text's first characters


def make_tiny_teacher(out: str, *, steps: int = 150, num_layers: int = 4, seed: int = 0, text: str | Path = TEXT,
                      log=print) -> str:
    """Train the teacher into `out` (written whole or not at all); an `out` that holds a model is kept as is."""
    if os.path.exists(os.path.join(out, "model.safetensors")):
        log(f"{out} already holds a model; delete it to rebuild")
        return out
    if not os.path.isfile(text):
        raise FileNotFoundError(f"--text {text}: no such file; pass a plain-text file to train the teacher on")
    with tempfile.TemporaryDirectory(prefix="tiny-teacher-") as work:
        tok = Path(work) / "tokenizer"
        train_tokenizer(tok, Path(text).read_text(encoding="utf-8")[:TOKENIZER_CHARS], VOCAB_SIZE)
        init = build_tiny_model(Path(work) / "init", "gpt2", tok, num_layers=num_layers, seed=seed, width=128)
        staging = out + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        train(TrainConfig(out=staging, dataset=str(text), student=str(init), loss="ce", steps=steps, lr=3e-3,
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
    parser.add_argument("--text", default=str(TEXT), help="plain-text file to train on (default: data/shakespeare.txt)")
    args = parser.parse_args()
    try:
        print(make_tiny_teacher(args.out, steps=args.steps, text=args.text))
    except FileNotFoundError as exc:
        sys.exit(f"error: {exc}")
