"""Post-training step costs on the ~50M model of configs/experiments/bench-50m.yaml (one CPU device, float32).

  python benchmarks/rl.py [--only dpo_vs_sft] [--steps 5] [key=value ...]

dpo_vs_sft: a DPO step (the live reference's forward over the batch, then the policy's forward and backward;
full training, so the reference is a frozen copy of the weights) against an SFT step over the very same rows
(B 8 x L 512, one chosen + rejected pair of 255 + 255 predictions per row, the response half counted): the
target is <= 2.2x, two forward passes of the pair and one backward. Both use the fused / chunked head
(train.loss_chunk of the config). Steps of the two alternate (A B A B ...), medians count. One JSON line each.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
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

CONFIG = ROOT / "configs" / "experiments" / "bench-50m.yaml"


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("dpo_vs_sft",), default=None, help="run one benchmark only")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method after the compiling one")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of bench-50m.yaml")
    args = parser.parse_args(argv)
    if args.only in (None, "dpo_vs_sft"):
        dpo_vs_sft(args.steps, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
