"""Post-training benchmarks (issue 16) on the ~50M model of configs/experiments/bench-50m.yaml and the toy task;
one JSON line per result.

  python benchmarks/rl.py [--only dpo_vs_sft,grpo-50m,toy] [--out DIR] [--steps N] [key=value ...]

- dpo_vs_sft: a DPO step (the live reference's forward over the batch, then the policy's forward and backward;
  full training, so the reference is a frozen copy of the weights) against an SFT step over the very same rows
  (B 8 x L 512, one chosen + rejected pair of 255 + 255 predictions per row, the response half counted): the
  target is <= 2.2x, two forward passes of the pair and one backward. Both use the fused / chunked head
  (train.loss_chunk of the config). Steps of the two alternate (A B A B ...), medians count; `key=value`
  overrides apply to bench-50m.yaml here.
- grpo-50m: GRPO on the ~50M model (float32, one CPU device, random init, byte-level prompts of the arithmetic
  task; a digit-share reward so that groups have spread), through `maxmodel train` in a subprocess: per step
  the rollout time (generation of every completion on the engine, weights pushed in place), the rewards +
  reference time and the train-step time, and the rollout's generated tokens/s. Steps after the first
  (compilation) count.
- toy: the example recipe (configs/recipes/arithmetic.yaml: data -> sft -> grpo -> rejection sampling -> sft)
  on the tiny byte-level model: greedy exact match over all 100 problems after SFT, after GRPO and after the
  rejection-sampling SFT, the sampled exact match of the first and last GRPO steps, and the largest KL.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from maxmodel.config import load_config  # noqa: E402
from maxmodel.data.preference import GroupStore, PreferenceRows  # noqa: E402
from maxmodel.finetune import objectives  # noqa: E402
from maxmodel.parallel.mesh import build_mesh  # noqa: E402
from maxmodel.parallel.rules import logical_rules  # noqa: E402
from maxmodel.train.step import BATCH_KEYS, abstract_state, build_train_step, create_params, global_batch  # noqa: E402

ROOT = REPO
CONFIG = REPO / "configs" / "experiments" / "bench-50m.yaml"
RECIPE = REPO / "configs" / "recipes" / "arithmetic.yaml"


def pair_rows(cfg, n_batches: int, seed: int = 3):
    """Batches of rows holding one random-token pair each: BOS + prompt (weight 0) + response (weight 1)."""
    rng = np.random.default_rng(seed)
    half = cfg.train.seq_len // 4
    groups, values = [], []
    for _ in range(n_batches * cfg.train.batch_size):
        prompt = rng.integers(3, cfg.model.vocab_size, half)
        docs = []
        for _ in range(2):
            tokens = np.concatenate([[1], prompt, rng.integers(3, cfg.model.vocab_size, half)]).astype(np.int32)
            docs.append((tokens, (np.arange(len(tokens)) > half).astype(np.uint8)))
        groups.append(docs)
        values.append([0.0, 0.0])
    rows = PreferenceRows(GroupStore(groups, values), cfg.train.seq_len, 0, "none", cfg.dpo.max_docs)
    b = cfg.train.batch_size
    return [{k: np.stack([rows[i * b + j][k] for j in range(b)]) for k in rows[0]} for i in range(n_batches)]


def _method(name, overrides):
    """Compile one method's step (and reference); returns (record, one timed step)."""
    cfg = load_config(str(CONFIG), overrides=overrides)
    mesh = build_mesh(cfg.mesh, jax.devices()[:1])
    rules = logical_rules(cfg.mesh.rules, cfg.mesh.rule_overrides)
    keys = BATCH_KEYS + objectives.get(cfg.train.objective).extra_keys
    local = [{k: v for k, v in b.items() if k in keys} for b in pair_rows(cfg, 2)]
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        graphdef, abstract = abstract_state(cfg)
        ts = build_train_step(cfg, graphdef, abstract, mesh)
        state = {"params": create_params(cfg, ts.param_shardings)}
        state["opt"] = ts.init_opt(state["params"])
        obj = objectives.get(cfg.train.objective)
        prepare = obj.prepare(cfg, ts, mesh) if obj.prepare else (lambda s, p, rows: global_batch(rows, mesh))

    def one_step(i):
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            t0 = time.perf_counter()
            batch = prepare(i, state["params"], local[i % 2])
            state["params"], state["opt"], m = ts.step_fn(state["params"], state["opt"], batch)
            jax.block_until_ready(m)
            state["loss"] = float(m["loss"])
            return time.perf_counter() - t0
    t0 = time.perf_counter()
    one_step(0)  # compiles
    return {"method": name, "compile_and_first_step_s": round(time.perf_counter() - t0, 1),
            "tokens_per_step": cfg.train.batch_size * cfg.train.seq_len}, one_step, state


def dpo_vs_sft(steps: int = 5, overrides=()) -> dict:
    """Median step times of DPO and SFT on the same rows, and their ratio (target <= 2.2)."""
    methods = {"sft": ["train.objective=sft", "data.source=synthetic"],
               "dpo": ["train.objective=dpo", "data.source=jsonl", "data.format=preference"]}
    prepared = [_method(name, extra + list(overrides)) for name, extra in methods.items()]
    times = [[] for _ in prepared]
    for i in range(steps):  # interleaved: the shared machine's load changes by the minute
        for j, (_, one_step, _) in enumerate(prepared):
            times[j].append(one_step(i + 1))
    rows = []
    for (record, _, state), t in zip(prepared, times):
        rows.append({**record, "step_times_s": [round(x, 3) for x in t], "step_time_s": statistics.median(t),
                     "loss": state["loss"], "jax": jax.__version__})
        print(json.dumps(rows[-1]))
    summary = {"dpo_step_time_over_sft": rows[1]["step_time_s"] / rows[0]["step_time_s"], "target": "<= 2.2"}
    print(json.dumps(summary))
    return summary


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


BENCHES = {"dpo_vs_sft": lambda a: dpo_vs_sft(a.steps, a.overrides),
           "grpo-50m": lambda a: grpo_50m(a.out, a.steps + 1), "toy": lambda a: toy(a.out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-rl"), help="runs of grpo-50m and toy")
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated: {', '.join(BENCHES)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (grpo-50m: after a compiling one)")
    parser.add_argument("overrides", nargs="*", help="dpo_vs_sft: key=value overrides of bench-50m.yaml")
    args = parser.parse_args()
    for name in args.only.split(","):
        if name not in BENCHES:
            parser.error(f"--only: unknown benchmark {name!r} (have {', '.join(BENCHES)})")
        print(json.dumps(BENCHES[name](args)), flush=True)


if __name__ == "__main__":
    main()
