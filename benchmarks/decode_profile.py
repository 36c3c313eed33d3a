"""Where one decode step's time goes: the engine's compiled step at a given batch, timed, then traced, its XLA
op times summed (the decode counterpart of step_profile.py).

  python benchmarks/decode_profile.py [CONFIG.yaml] [key=value ...] [--batch 16] [--prompt-len 128]
                                      [--steps 32] [--top 15]
  (default config: configs/experiments/bench-50m.yaml, weights at initialisation)

All `--batch` slots hold the same greedy request after a `--prompt-len` prefill; the step is timed as the
batcher runs it (each step's tokens synced to the host), median over `--steps`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_profile import REPO, by_kind_and_op, op_names, op_times, print_ops  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", help="an optional CONFIG.yaml, then key.sub=value overrides")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps")
    parser.add_argument("--top", type=int, default=15, help="largest ops listed")
    parser.add_argument("--by-instruction", action="store_true", help="list HLO instructions, not JAX op names")
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    from flax import nnx

    from maxmodel import distributed
    from maxmodel.config import load_config
    from maxmodel.config.loader import split_config_args
    from maxmodel.inference.engine import Engine, EngineOptions
    from maxmodel.inference.sampling import SamplingOptions, stack_params
    from maxmodel.parallel.mesh import build_mesh
    from maxmodel.parallel.rules import mesh_rules
    from maxmodel.train.step import abstract_state, create_params

    config_file, overrides = split_config_args(args.args)
    cfg = load_config(config_file or str(REPO / "configs/experiments/bench-50m.yaml"), overrides)
    distributed.initialize(cfg.run.cpu_devices)
    mesh = build_mesh(cfg.mesh)
    rules = mesh_rules(cfg.mesh, mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        graphdef, abstract = abstract_state(cfg)
        from maxmodel.train.step import build_train_step
        params = create_params(cfg, build_train_step(cfg, graphdef, abstract, mesh).param_shardings)
    eng = Engine(cfg, graphdef, params, mesh, rules,
                 EngineOptions(max_slots=args.batch, max_len=args.prompt_len + args.steps + 16))
    prompt = [1] + list(np.random.default_rng(0).integers(5, 8192, args.prompt_len - 1))
    row, logits, _ = eng.prefill(prompt)
    for slot in range(args.batch):
        eng.insert(row, logits, slot, prompt, stack_params([SamplingOptions(temperature=0.0)], 1))
    active = np.ones(eng.max_slots, bool)
    for _ in range(3):
        eng.step(active)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        eng.step(active)
        times.append(time.perf_counter() - t0)
    with eng.context():
        names = op_names(eng._step.lower(eng.run_params, eng.state, jax.numpy.asarray(active), num_top=0)
                         .compile().as_text())
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(f"{tmp}/trace")
        eng.step(active)
        jax.profiler.stop_trace()
        totals = op_times(f"{tmp}/trace")
    step = statistics.median(times)
    def label(name):
        op = names.get(name, name).removeprefix("jit(_step_fn)/")
        return f"{name}: {op}" if args.by_instruction else op
    by_kind, by_op = by_kind_and_op(totals, label)
    print(f"decode step {step * 1e3:.2f} ms at batch {args.batch} (median of {args.steps}), "
          f"{args.batch / step:,.1f} tokens/s")
    print_ops(by_kind, by_op, args.top, digits=2)
    return 0


if __name__ == "__main__":
    from maxmodel.host_allocator import restart_with_fast_allocator
    restart_with_fast_allocator()  # profile decoding as `maxmodel generate` runs it (maxmodel/host_allocator.py)
    sys.exit(main(sys.argv[1:]))
