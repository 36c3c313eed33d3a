"""Where one train step's time goes: a jax.profiler trace of a compiled step, its XLA op times summed.

  python benchmarks/step_profile.py [CONFIG.yaml] [key=value ...] [--steps 4] [--top 15] [--by-instruction]
  (default config: configs/experiments/bench-50m.yaml)

Times `--steps` steps (median), then traces one more and sums the trace's op durations by kind: matmuls
(XLA:CPU's `dot` and library `ynn_fusion` ops, which also carry the reductions fused into them) versus
everything else (elementwise loops, copies, transposes), with the largest ops by their JAX op name. On CPU the
thunks of independent ops may overlap, so the sums can exceed the step's wall time slightly.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNTIME_EVENTS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "ParseArguments",
                  "CommonPjRtLoadedExecutable")


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX op name in its metadata (for reading the profile)."""
    names = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s+%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
        if m:
            names[m.group(1)] = m.group(2).removeprefix("jit(step)/")
    return names


def op_times(trace_dir: str) -> collections.Counter:
    """Summed duration (µs) of each XLA op in the trace."""
    path = next(Path(trace_dir).rglob("*.trace.json.gz"))
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    totals = collections.Counter()
    for event in events:  # loops (`while`) contain their body's ops: counting both would count twice
        if event.get("ph") == "X" and not event["name"].startswith((*RUNTIME_EVENTS, "while")):
            totals[event["name"]] += event["dur"]
    return totals


def by_kind_and_op(totals: collections.Counter, label) -> tuple[collections.Counter, collections.Counter]:
    """Seconds by kind (matmul: XLA:CPU `dot`s and library fusions, which carry the reductions fused into
    them; other) and by (kind, label(instruction name))."""
    by_kind, by_op = collections.Counter(), collections.Counter()
    for name, us in totals.items():
        kind = "matmul" if name.startswith(("dot", "ynn_fusion", "xnn_fusion")) else "other"
        by_kind[kind] += us / 1e6
        by_op[(kind, label(name))] += us / 1e6
    return by_kind, by_op


def print_ops(by_kind, by_op, top: int, digits: int = 1) -> None:
    print("traced step, summed op time: " + ", ".join(f"{k} {v * 1e3:.{digits}f} ms" for k, v in by_kind.most_common()))
    for (kind, op), seconds in by_op.most_common(top):
        print(f"  {seconds * 1e3:8.{digits}f} ms  {kind:6s}  {op[:110]}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", help="an optional CONFIG.yaml, then key.sub=value overrides")
    parser.add_argument("--steps", type=int, default=4, help="timed steps before the traced one")
    parser.add_argument("--top", type=int, default=15, help="largest ops listed")
    parser.add_argument("--by-instruction", action="store_true", help="list HLO instructions, not JAX op names")
    args = parser.parse_args(argv)

    import jax
    from flax import nnx

    from maxmodel import distributed
    from maxmodel.config import load_config
    from maxmodel.config.loader import split_config_args
    from maxmodel.data.pipeline import make_train_data
    from maxmodel.parallel.mesh import build_mesh
    from maxmodel.parallel.rules import mesh_rules
    from maxmodel.train.step import abstract_state, build_train_step, create_params, global_batch

    config_file, overrides = split_config_args(args.args)
    cfg = load_config(config_file or str(REPO / "configs/experiments/bench-50m.yaml"), overrides)
    distributed.initialize(cfg.run.cpu_devices)
    mesh = build_mesh(cfg.mesh)
    with tempfile.TemporaryDirectory() as tmp, jax.set_mesh(mesh), \
            nnx.logical_axis_rules(mesh_rules(cfg.mesh, mesh)):
        graphdef, abstract = abstract_state(cfg)
        ts = build_train_step(cfg, graphdef, abstract, mesh)
        params = create_params(cfg, ts.param_shardings)
        opt_state = ts.init_opt(params)
        batch = global_batch(next(make_train_data(cfg, Path(tmp) / "run").train), mesh)
        compiled = ts.step_fn.lower(params, opt_state, batch).compile()
        names = op_names(compiled.as_text())
        times = []
        for _ in range(args.steps + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            params, opt_state, metrics = compiled(params, opt_state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        jax.profiler.start_trace(f"{tmp}/trace")
        params, opt_state, metrics = compiled(params, opt_state, batch)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        totals = op_times(f"{tmp}/trace")

    step = statistics.median(times[1:])
    tokens = cfg.train.batch_size * cfg.train.seq_len
    def label(name):
        op = names.get(name, name)
        return f"{name}: {op}" if args.by_instruction else op
    by_kind, by_op = by_kind_and_op(totals, label)
    print(f"step {step:.3f} s (median of {args.steps}), {tokens / step:,.0f} tokens/s")
    print_ops(by_kind, by_op, args.top)
    return 0


if __name__ == "__main__":
    from maxmodel.host_allocator import restart_with_fast_allocator
    restart_with_fast_allocator()  # profile the step as `maxmodel train` runs it (maxmodel/host_allocator.py)
    sys.exit(main(sys.argv[1:]))
