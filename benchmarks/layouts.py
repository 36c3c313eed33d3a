"""Tokens/s of the default model under each parallel layout on 8 emulated CPU devices.

    .venv/bin/python benchmarks/layouts.py [--steps 8] [--out results.jsonl]

Each layout runs in its own process (the device count is fixed per process); after 2 warm-up steps the
median step time is taken. On one CPU the emulated devices share the same cores, so these figures compare the
overheads of the layouts (collectives, bubbles, recomputation), not real scaling.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from maxmodel import jsonio

LAYOUTS = {
    "1 device": ["run.cpu_devices=1", "mesh.data=1"],
    "data=8": ["mesh.data=8"],
    "fsdp=8": ["mesh.data=1", "mesh.fsdp=8", "mesh.rules=fsdp"],
    "data=2 tensor=4": ["mesh.data=2", "mesh.tensor=4", "model.num_kv_heads=4"],
    "data=2 fsdp=2 tensor=2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    "data=2 sequence=4 allgather": ["mesh.data=2", "mesh.sequence=4", "model.attention.context_parallel=allgather"],
    "data=2 sequence=4 ring": ["mesh.data=2", "mesh.sequence=4", "model.attention.context_parallel=ring"],
    "stage=4 data=2 gpipe": ["mesh.data=2", "mesh.stage=4", "pipeline.microbatches=4"],
    "stage=4 data=2 1f1b": ["mesh.data=2", "mesh.stage=4", "pipeline.microbatches=4", "pipeline.schedule=1f1b"],
    "stage=4 data=2 zero_bubble": ["mesh.data=2", "mesh.stage=4", "pipeline.microbatches=4",
                                   "pipeline.schedule=zero_bubble"],
    "stage=2 data=4 circular repeats=2": ["mesh.data=4", "mesh.stage=2", "pipeline.microbatches=2",
                                          "pipeline.repeats=2"],
    "stage=2 data=4 interleaved_1f1b repeats=2": ["mesh.data=4", "mesh.stage=2", "pipeline.microbatches=2",
                                                  "pipeline.repeats=2", "pipeline.schedule=interleaved_1f1b"],
    "stage=2 fsdp=2 tensor=2": ["mesh.data=1", "mesh.stage=2", "mesh.fsdp=2", "mesh.tensor=2",
                                "pipeline.microbatches=4"],
}

CHILD = r"""
import json, statistics, sys, time
from maxmodel import distributed
from maxmodel.config import load_config
cfg = load_config(overrides=sys.argv[2:])
distributed.initialize(cfg.run.cpu_devices)
import jax
from flax import nnx
from maxmodel.data.windows import SyntheticSource
from maxmodel.parallel.mesh import build_mesh
from maxmodel.parallel.rules import mesh_rules
from maxmodel.train.step import abstract_state, build_train_step, create_params, global_batch
import numpy as np
from maxmodel import jsonio
mesh = build_mesh(cfg.mesh)
src = SyntheticSource(cfg.model.vocab_size, cfg.train.seq_len, 0)
with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_rules(cfg.mesh, mesh)):
    graphdef, abstract = abstract_state(cfg)
    ts = build_train_step(cfg, graphdef, abstract, mesh)
    params = create_params(cfg, ts.param_shardings); opt = ts.init_opt(params)
    times = []
    for i in range(int(sys.argv[1]) + 2):
        rows = [src[i * cfg.train.batch_size + j] for j in range(cfg.train.batch_size)]
        batch = global_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]}, mesh)
        t0 = time.perf_counter()
        params, opt, m = ts.step_fn(params, opt, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
step = statistics.median(times[2:])
print(jsonio.dumps({"step_time": step, "tokens_per_sec": cfg.train.batch_size * cfg.train.seq_len / step,
                  "loss": float(m["loss"])}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="")
    parser.add_argument("--only", default="", help="run the layouts whose name contains this")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every layout")
    ns = parser.parse_args()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    rows = []
    for name, overrides in LAYOUTS.items():
        if ns.only not in name:
            continue
        cmd = [sys.executable, "-c", CHILD, str(ns.steps), "data.source=synthetic", *overrides, *ns.overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            print(f"{name:<30} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
            continue
        result = {"layout": name, **json.loads(proc.stdout.strip().splitlines()[-1])}
        rows.append(result)
        print(f"{name:<30} {result['tokens_per_sec']:10.0f} tokens/s   step {result['step_time'] * 1e3:8.1f} ms   "
              f"loss {result['loss']:.4f}", flush=True)
    if ns.out:
        with open(ns.out, "a") as f:
            f.writelines(jsonio.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
