"""Train-step time of moe-tiny: dropless vs capacity dispatch vs a dense model with the same active parameters.

    python benchmarks/moe.py [--batch 8] [--seq 256] [--iters 10] [--capacity-factor 1.25]
                             [--devices 1] [--expert 1] [--json]

Each variant is one full jitted train step (forward, backward, AdamW) on synthetic tokens, float32. The
dense model is moe-tiny without experts and with d_ff = top_k × the experts' d_ff, so it has the same active
(per-token) parameters, minus the router. Prints the parameter counts (total / active), the median step time
over --iters steps after a warm-up (compile) step, and tokens/s. With --devices > 1, devices are emulated on
the CPU (they share its cores) and --expert sets mesh.expert (the rest is data).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from maxmodel import jsonio


def variants(args) -> dict[str, list[str]]:
    moe = ["model.name=moe-tiny"]
    return {
        "moe dropless": moe,
        f"moe capacity {args.capacity_factor}": moe + [f"model.moe.capacity_factor={args.capacity_factor}"],
        "dense, same active": moe + ["model.moe.num_experts=0", "model.d_ff=512"],
    }


def time_variant(overrides, args, devices):
    import jax
    import numpy as np
    from flax import nnx

    from maxmodel.config import load_config
    from maxmodel.models.params import count_params
    from maxmodel.parallel.mesh import build_mesh
    from maxmodel.parallel.rules import mesh_rules
    from maxmodel.train.step import abstract_state, build_train_step, create_params, global_batch

    cfg = load_config(overrides=overrides + [f"train.batch_size={args.batch}", f"train.seq_len={args.seq}",
                                             f"mesh.expert={args.expert}", "mesh.data=-1"])
    counts = count_params(cfg)
    mesh = build_mesh(cfg.mesh, devices)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_rules(cfg.mesh, mesh)):
        graphdef, abstract = abstract_state(cfg)
        ts = build_train_step(cfg, graphdef, abstract, mesh)
        params = create_params(cfg, ts.param_shardings)
        opt_state = ts.init_opt(params)
        toks = rng.integers(0, cfg.model.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
        batch = global_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:],
                              "segment_ids": np.ones((args.batch, args.seq), np.int32),
                              "positions": np.broadcast_to(np.arange(args.seq), (args.batch, args.seq)).astype(np.int32),
                              "loss_mask": np.ones((args.batch, args.seq), np.float32)}, mesh)
        t0 = time.perf_counter()
        params, opt_state, m = ts.step_fn(params, opt_state, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            params, opt_state, m = ts.step_fn(params, opt_state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    return {"total_params": counts["total"], "active_params": counts["active"], "step_ms": 1e3 * step,
            "tokens_per_sec": args.batch * args.seq / step, "first_step_s": compile_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--expert", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
    import jax
    devices = jax.devices()[:args.devices]
    if len(devices) < args.devices:
        print(f"need {args.devices} devices, found {len(devices)}")
        return 2
    results = {name: time_variant(ov, args, devices) for name, ov in variants(args).items()}
    if args.json:
        print(jsonio.dumps({"device": devices[0].device_kind, "devices": len(devices), "expert": args.expert,
                          "batch": args.batch, "seq": args.seq, "results": results}, indent=1))
        return 0
    print(f"{devices[0].device_kind} × {len(devices)} (mesh.expert={args.expert}), batch {args.batch} × seq "
          f"{args.seq}, median of {args.iters} steps")
    print(f"{'variant':<22}{'total':>10}{'active':>10}{'ms/step':>10}{'tokens/s':>11}{'compile s':>11}")
    for name, r in results.items():
        print(f"{name:<22}{r['total_params']:>10,}{r['active_params']:>10,}{r['step_ms']:>10.1f}"
              f"{r['tokens_per_sec']:>11,.0f}{r['first_step_s']:>11.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
