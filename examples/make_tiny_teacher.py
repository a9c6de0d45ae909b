"""Make the tiny teacher of the examples and benchmarks: a 4-layer GPT-2 trained briefly on tiny Shakespeare.

Run from the repository root:  .venv/bin/python examples/make_tiny_teacher.py examples/tiny-teacher
The same as `kdtrain make-teacher --dataset data/shakespeare.txt --out OUT --steps 150` (trainer/make_teacher.py:
a byte-level BPE trained on the text, a random 4-layer, 128-wide GPT-2, then `kdtrain run --loss ce` on the text),
which examples/tiny_chain.yaml runs as its first stage; this script keeps the name bench/common.py imports.
The text is the repository's data/shakespeare.txt (data/README.md), or --text PATH; nothing outside the checkout
is needed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.errors import UserError
from trainer.make_teacher import MakeTeacherConfig, make_teacher

TEXT = REPO / "data" / "shakespeare.txt"


def make_tiny_teacher(out: str, *, steps: int = 150, num_layers: int = 4, seed: int = 0, text: str | Path = TEXT,
                      log=print) -> str:
    """Train the teacher into `out` (a kdtrain run folder); an `out` that holds a model is kept as is."""
    if os.path.exists(os.path.join(out, "model.safetensors")):
        log(f"{out} already holds a model; delete it to rebuild")
        return out
    if not os.path.isfile(text):
        raise FileNotFoundError(f"--text {text}: no such file; pass a plain-text file to train the teacher on")
    make_teacher(MakeTeacherConfig(dataset=str(text), out=out, steps=steps, layers=num_layers, seed=seed), log=log)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(REPO / "examples" / "tiny-teacher"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--text", default=str(TEXT), help="plain-text file to train on (default: data/shakespeare.txt)")
    args = parser.parse_args()
    try:
        print(make_tiny_teacher(args.out, steps=args.steps, text=args.text))
    except (FileNotFoundError, UserError) as exc:
        sys.exit(f"error: {exc}")
