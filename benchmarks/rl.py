"""RL benchmarks (issue 16), each through maxmodel's own CLI in a subprocess, one JSON line per result.

  python benchmarks/rl.py OUT [--only grpo-50m,toy] [--steps 6]

- grpo-50m: GRPO on the ~50M model of configs/experiments/bench-50m.yaml (float32, one CPU device, random
  init, byte-level prompts of the arithmetic task; a digit-share reward so that groups have spread): per
  step the rollout time (generation of every completion on the engine, weights pushed in place) against the
  train-step time, and the rollout's generated tokens/s. Steps after the first (compilation) count.
- toy: the example recipe's first stages (configs/recipes/arithmetic.yaml: data -> sft -> grpo) on the tiny
  byte-level model: greedy exact match over all 100 problems before GRPO (the SFT model) and after, the
  sampled reward of the first and last 10 GRPO steps, and the largest KL to the reference.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CONFIG = REPO / "configs" / "experiments" / "bench-50m.yaml"
RECIPE = REPO / "configs" / "recipes" / "arithmetic.yaml"


def digit_share(prompts, completions, **_):
    """The share of a completion's characters that are digits: a reward with spread for any policy."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def run(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'benchmarks'}"}
    print("+ " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, *args], env=env, check=True, cwd=REPO)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def grpo_50m(out: Path, steps: int) -> dict:
    from maxmodel.finetune.tasks import arithmetic
    arithmetic.write(out / "data")
    name = "grpo-50m"
    run("-m", "maxmodel.cli", "train", str(CONFIG), f"run.output_dir={out}", f"run.name={name}",
        "train.objective=grpo", "data.source=jsonl", "data.format=prompt", f"data.path={out / 'data/prompts.jsonl'}",
        "data.tokenizer=bytes", "train.seq_len=48", "train.batch_size=32", "train.loss_chunk=0",
        f"train.steps={steps}", "rl.group_size=4", "rl.max_new_tokens=32", "rl.beta=0.04",
        "rl.rewards=[rl.digit_share]", "run.log_every=1", "run.cpu_devices=1", "run.progress=false",
        "run.sample_tokens=0", "checkpoint.every_steps=100000", "optimizer.warmup_steps=0")
    rs = metrics(out / name)[1:]  # the first step compiles the step and the engine
    rollout = statistics.median(r["rollout_seconds"] for r in rs)
    # the loop's step_time is the whole step, the Preparer's rollout + rewards + reference included
    prepare = statistics.median(r["prepare_seconds"] for r in rs)
    train = statistics.median(r["step_time"] - r["prepare_seconds"] for r in rs)
    step = statistics.median(r["step_time"] for r in rs)
    return {"bench": "grpo-50m", "steps_timed": len(rs), "completions_per_step": 32, "step_seconds": step,
            "rollout_seconds": rollout, "reward_and_reference_seconds": prepare - rollout,
            "train_step_seconds": train, "rollout_share": rollout / step,
            "rollout_tokens_per_sec": statistics.median(r["rollout_tokens_per_sec"] for r in rs),
            "completion_length": statistics.mean(r["completion_length"] for r in rs)}


def greedy_exact_match(model_dir: Path, prompts: Path) -> float:
    from maxmodel.finetune.tasks.arithmetic import exact_match
    from maxmodel.inference.load import load_engine
    from maxmodel.inference.sampling import SamplingOptions
    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    gen = load_engine(model_dir, ["run.cpu_devices=1"], max_slots=128, max_len=16)
    outs = gen.generate([r["prompt"] for r in records], SamplingOptions(max_new_tokens=4, temperature=0.0))
    em = exact_match(None, [o.completions[0].text for o in outs], [r["answer"] for r in records])
    return sum(em) / len(em)


def toy(out: Path) -> dict:
    from maxmodel.finetune.recipe import Recipe
    run("-c", "import sys; from maxmodel.finetune.recipe import main; sys.exit(main(sys.argv[1:]))", str(RECIPE),
        "--output-dir", str(out / "recipe"), "run.progress=false")
    state = Recipe(RECIPE, [], out / "recipe").state
    prompts = out / "recipe" / "data" / "prompts.jsonl"
    rs = [r for r in metrics(out / "recipe" / "grpo") if "reward" in r]
    first, last = rs[:max(1, len(rs) // 6)], rs[-max(1, len(rs) // 6):]
    return {"bench": "toy-grpo", "greedy_exact_match_sft": greedy_exact_match(Path(state["sft"]["model"]), prompts),
            "greedy_exact_match_grpo": greedy_exact_match(Path(state["grpo"]["model"]), prompts),
            "greedy_exact_match_rejection_sft": greedy_exact_match(Path(state["sft2"]["model"]), prompts),
            "sampled_exact_match_first_steps": statistics.mean(r["reward/exact_match"] for r in first),
            "sampled_exact_match_last_steps": statistics.mean(r["reward/exact_match"] for r in last),
            "max_kl": max(r["kl"] for r in rs), "grpo_steps": rs[-1]["step"]}


BENCHES = {"grpo-50m": lambda a: grpo_50m(a.out, a.steps), "toy": lambda a: toy(a.out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated: {', '.join(BENCHES)}")
    parser.add_argument("--steps", type=int, default=6, help="GRPO steps of grpo-50m (the first compiles)")
    args = parser.parse_args()
    for name in args.only.split(","):
        if name not in BENCHES:
            parser.error(f"--only: unknown benchmark {name!r} (have {', '.join(BENCHES)})")
        print(json.dumps(BENCHES[name](args)), flush=True)


if __name__ == "__main__":
    main()
