"""Small-number arithmetic, the toy verifiable task of the RL recipes: prompts "a+b=" / "a-b=" / "a*b=" with
their exact answer, made by a seeded generator, and two rule-based rewards (DeepSeek-R1's accuracy and format
rewards, in miniature): `exact_match` (the completion is the right integer) and `format` (it is an integer and
nothing else). A byte-level tiny model learns the format in a short SFT warm start and part of the facts;
GRPO then raises its exact-match rate.

    python -m maxmodel.finetune.tasks.arithmetic OUT_DIR [--seed 0] [--max-operand 9] [--ops +]

writes OUT_DIR/prompts.jsonl ({"prompt", "answer"}: every problem, for RL), OUT_DIR/sft.jsonl
({"prompt", "completion"}: a seeded share of them with the answers, the warm start) and OUT_DIR/eval.jsonl
(the held-out problems the SFT set leaves out).
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from pathlib import Path

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
INTEGER = re.compile(r"-?\d+")


def problems(max_operand: int = 9, ops: str = "+") -> list[dict]:
    return [{"prompt": f"{a}{op}{b}=", "answer": str(OPS[op](a, b))}
            for op in ops for a, b in itertools.product(range(max_operand + 1), repeat=2)]


def write(out_dir: str | Path, seed: int = 0, max_operand: int = 9, ops: str = "+", sft_share: float = 0.5) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = problems(max_operand, ops)
    random.Random(seed).shuffle(items)
    cut = int(len(items) * sft_share)
    files = {"prompts": items, "sft": [{"prompt": p["prompt"], "completion": p["answer"]} for p in items[:cut]],
             "eval": items[cut:]}
    for name, rows in files.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {name: len(rows) for name, rows in files.items()}


def exact_match(prompts, completions, answer, **_) -> list[float]:
    """1 when the completion, stripped, is exactly the answer."""
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def format(prompts, completions, **_) -> list[float]:  # noqa: A001 - the reward's name in logs
    """1 when the completion is one integer and nothing else."""
    return [float(INTEGER.fullmatch(c.strip()) is not None) for c in completions]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-operand", type=int, default=9)
    ap.add_argument("--ops", default="+", help="any of + - *")
    ap.add_argument("--sft-share", type=float, default=0.5)
    a = ap.parse_args(argv)
    if set(a.ops) - set(OPS):
        ap.error(f"--ops: {a.ops!r} has operators other than {''.join(OPS)}")
    print(json.dumps(write(a.out_dir, a.seed, a.max_operand, a.ops, a.sft_share)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
