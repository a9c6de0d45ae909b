"""Write the training prompts of examples/qwen_gsm8k_chain.yaml: GSM8K questions with the '#### N' instruction.

Run from the repository root:  python examples/prepare_gsm8k.py examples/data/gsm8k_train.jsonl
Each row of the source (default: the hub's openai/gsm8k, configuration main, split train; or a local
.jsonl with question/answer fields) becomes {"question": gsm8k_prompt(question), "answer": answer}:
the question followed by trainer.config.GSM8K_INSTRUCTION, exactly as `kdtrain eval --metrics gsm8k`
asks it, so the teacher's traces (`kdcache build --mode generate --filter gsm8k-answer`) and the
evaluation see the same prompt. The answer keeps GSM8K's reference solution, ending in '#### N'.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.datasets import load_rows
from trainer.generation_metrics import GSM8K_INSTRUCTION, gsm8k_prompt


def prepare_gsm8k(out: str, *, source: str = "openai/gsm8k", split: str = "train", config: str | None = "main",
                  limit: int | None = None, instruction: str = GSM8K_INSTRUCTION) -> int:
    """Write out (jsonl) from source; returns the number of rows written. Nothing is left half-written."""
    local = os.path.exists(os.path.expanduser(source))
    rows, columns = load_rows(source, None if local else split, None if local else config)
    missing = [f for f in ("question", "answer") if f not in columns]
    if missing:
        raise SystemExit(f"{source} has no field(s) {missing}; its fields are: {', '.join(columns)}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    count = 0
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"question": gsm8k_prompt(str(row["question"]), instruction),
                                "answer": str(row["answer"])}, ensure_ascii=False) + "\n")
            count += 1
            if limit is not None and count >= limit:
                break
    os.replace(out + ".tmp", out)
    return count


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(REPO / "examples" / "data" / "gsm8k_train.jsonl"))
    parser.add_argument("--source", default="openai/gsm8k", help="hub data set or local .jsonl (question, answer)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--config", default="main", help="hub configuration (openai/gsm8k: main or socratic)")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    n = prepare_gsm8k(args.out, source=args.source, split=args.split, config=args.config, limit=args.limit)
    print(f"{args.out}: {n} prompts")
