"""LoRA vs full fine-tuning on the ~50M model of configs/experiments/bench-50m.yaml (one CPU device, float32):
the compiled step's memory (XLA memory_analysis: its arguments are the parameters, the optimizer state and the
batch; gradients live in its temporaries with the activations) and its step time.

  python benchmarks/finetune.py [--steps 3] [--rank 16] [--tunix-python PY] [key=value ...]
One JSON line per method; steps of the two methods alternate and the median counts. state_bytes = params + grads + optimizer state, with params + optimizer state read
from XLA's argument bytes (minus the batch) and grads = the trainable parameters' bytes (the step
differentiates nothing else: train/step.py's SplitStep). With --tunix-python (a venv with google-tunix), Tunix's
LoRA SFT of the same shape (benchmarks/peers/tunix_lora.py) runs between the two halves of the timed steps,
and the last line compares tokens/s."""
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

import jax
import numpy as np
from flax import nnx

from maxmodel.config import load_config
from maxmodel.data.windows import SyntheticSource
from maxmodel.parallel.mesh import build_mesh
from maxmodel.parallel.rules import logical_rules
from maxmodel.train.state_bytes import state_report
from maxmodel.train.step import abstract_state, build_train_step, create_params, global_batch

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=5, help="timed steps per method after one warm-up, interleaved")
parser.add_argument("--rank", type=int, default=16)
parser.add_argument("--tunix-python", help="the Python of a venv with google-tunix: run its LoRA SFT alongside")
parser.add_argument("--tunix-steps", type=int, default=8)
parser.add_argument("overrides", nargs="*")
args = parser.parse_args()
CONFIG = ROOT / "configs" / "experiments" / "bench-50m.yaml"
METHODS = {"full": ["peft.method=none"],
           f"lora-r{args.rank}": ["peft.method=lora", f"peft.rank={args.rank}", f"peft.alpha={2 * args.rank}",
                                  "peft.targets=all"]}


def batches(cfg, n):
    src = SyntheticSource(cfg.model.vocab_size, cfg.train.seq_len, seed=3)
    b = cfg.train.batch_size
    for i in range(n):
        rows = [src[i * b + j] for j in range(b)]
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def prepare(name, extra):
    """Compile one method's step; returns (its record without timings, a function that runs one timed step)."""
    cfg = load_config(str(CONFIG), overrides=extra + args.overrides)
    mesh = build_mesh(cfg.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_rules(cfg.mesh.rules, cfg.mesh.rule_overrides)):
        graphdef, abstract = abstract_state(cfg)
        ts = build_train_step(cfg, graphdef, abstract, mesh)
        state = {"params": create_params(cfg, ts.param_shardings)}
        state["opt"] = ts.init_opt(state["params"])
        data = [global_batch(b, mesh) for b in batches(cfg, 2)]
        t0 = time.perf_counter()
        mem = ts.step_fn.lower(state["params"], state["opt"], data[0]).compile().memory_analysis()
        compile_s = time.perf_counter() - t0
        report = state_report(abstract, ts.trainable, ts.abstract_opt)

    def one_step(i):
        with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_rules(cfg.mesh.rules, cfg.mesh.rule_overrides)):
            t0 = time.perf_counter()
            state["params"], state["opt"], m = ts.step_fn(state["params"], state["opt"], data[i % 2])
            jax.block_until_ready(m)
            state["loss"] = float(m["loss"])
            return time.perf_counter() - t0
    one_step(0)  # the first call compiles (the jit's own cache, apart from the AOT compile above)
    batch_bytes = sum(x.nbytes for x in data[0].values())
    params_opt = mem.argument_size_in_bytes - batch_bytes
    record = {"method": name, "trainable_params": report["trainable_params"], "total_params": report["total_params"],
              "xla_argument_bytes": mem.argument_size_in_bytes, "xla_temp_bytes": mem.temp_size_in_bytes,
              "xla_params_plus_opt_bytes": params_opt, "grad_bytes": report["grad_bytes"],
              "state_bytes": params_opt + report["grad_bytes"], "compile_s": compile_s, "jax": jax.__version__,
              "tokens_per_step": cfg.train.batch_size * cfg.train.seq_len}
    return record, one_step, state


prepared = [prepare(name, extra) for name, extra in METHODS.items()]
times = [[] for _ in prepared]
tunix = None
for i in range(args.steps):  # interleaved (A B A B ...): the shared machine's load changes by the minute
    if args.tunix_python and i == args.steps // 2:  # the peer in the middle, under the same load
        import subprocess
        out = subprocess.run([args.tunix_python, str(ROOT / "benchmarks" / "peers" / "tunix_lora.py"),
                              "--steps", str(args.tunix_steps), "--rank", str(args.rank)],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        tunix = json.loads(lines[-1]) if out.returncode == 0 and lines else {
            "peer": "tunix", "failed": out.returncode, "stderr": out.stderr[-2000:]}
    for j, (_, one_step, _) in enumerate(prepared):
        times[j].append(one_step(i + 1))
rows = []
for (record, _, state), t in zip(prepared, times):
    step = statistics.median(t)
    rows.append({**record, "step_times_s": [round(x, 3) for x in t], "step_time_s": step,
                 "tokens_per_s": record["tokens_per_step"] / step, "loss": state["loss"]})
for r in rows:
    print(json.dumps(r))
full, lora = rows
print(json.dumps({"lora_state_over_full": lora["state_bytes"] / full["state_bytes"],
                  "lora_step_time_over_full": lora["step_time_s"] / full["step_time_s"],
                  "target": "state <= 0.40, step time <= 1.0"}))
if tunix is not None:
    print(json.dumps(tunix))
    if "tokens_per_s" in tunix:
        print(json.dumps({"maxmodel_lora_over_tunix_lora_tokens_per_s": lora["tokens_per_s"] / tunix["tokens_per_s"],
                          "target": ">= 1.1"}))
