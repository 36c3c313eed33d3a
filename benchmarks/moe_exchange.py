"""Bytes of the dropless expert exchange per train step: the padded all_to_all against ragged_all_to_all.

    .venv/bin/python benchmarks/moe_exchange.py [--expert 4] [--top-k 1 2 4] [--steps 3] [--batch 16]
                                                [--seq 128] [--json]

moe-tiny (8 experts, 4 layers) on 8 emulated CPU devices, mesh.expert=--expert × data (the rest), synthetic
tokens, float32. For each top-k, --steps train steps with `model.moe.exchange=padded` and with `ragged` from
the same initial weights and data; prints each step's loss under both (they must agree) and the MoE stat
`sent_rows`: the token rows the dispatch sent to other devices, summed over devices and MoE layers. A step
moves those rows 4 times (the forward's dispatch and return, and their transposes in the backward), so

    bytes per step = 4 · sent_rows · d_model · itemsize.

padded sends (n-1)·N rows per device and layer, N = tokens·k, whatever the routing; ragged sends exactly
the copies routed to an expert on another device. XLA:CPU has no ragged-all-to-all: here its rows are
counted while `emulated_ragged_all_to_all` (all_gathers) moves them, so the step times printed are not the
collective's; on TPU / GPU the same program runs the real collective (the TPU compile is in
tests/test_moe_kernels.py).
"""
from __future__ import annotations

import argparse
import os
import time

from maxmodel import jsonio


def run(exchange: str, top_k: int, args, devices):
    import jax
    import numpy as np
    from flax import nnx

    from maxmodel.config import load_config
    from maxmodel.parallel.mesh import build_mesh
    from maxmodel.parallel.rules import mesh_rules
    from maxmodel.train.step import abstract_state, build_train_step, create_params, global_batch

    cfg = load_config(overrides=["model.name=moe-tiny", f"model.moe.top_k={top_k}",
                                 f"model.moe.exchange={exchange}", f"train.batch_size={args.batch}",
                                 f"train.seq_len={args.seq}", f"mesh.expert={args.expert}", "mesh.data=-1",
                                 "run.progress=false"])
    mesh = build_mesh(cfg.mesh, devices)
    rng = np.random.default_rng(0)
    out = {"exchange": exchange, "top_k": top_k, "loss": [], "sent_rows": [], "step_s": []}
    with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_rules(cfg.mesh, mesh)):
        graphdef, abstract = abstract_state(cfg)
        ts = build_train_step(cfg, graphdef, abstract, mesh)
        params = create_params(cfg, ts.param_shardings)
        opt_state = ts.init_opt(params)
        for _ in range(args.steps):
            toks = rng.integers(0, cfg.model.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
            batch = global_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:],
                                  "segment_ids": np.ones((args.batch, args.seq), np.int32),
                                  "positions": np.broadcast_to(np.arange(args.seq), (args.batch, args.seq))
                                  .astype(np.int32),
                                  "loss_mask": np.ones((args.batch, args.seq), np.float32)}, mesh)
            t0 = time.perf_counter()
            params, opt_state, m = ts.step_fn(params, opt_state, batch)
            out["loss"].append(float(m["loss"]))
            out["step_s"].append(time.perf_counter() - t0)
            out["sent_rows"].append(float(np.sum(m["moe"]["sent_rows"])))
    copies = args.batch * args.seq * top_k
    out["copies"] = copies
    out["bytes_per_step"] = [4 * r * cfg.model.d_model * 4 for r in out["sent_rows"]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expert", type=int, default=4)
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from maxmodel import distributed
    distributed.initialize(cpu_devices=8)
    import jax
    rows = [run(ex, k, args, jax.devices()) for k in args.top_k for ex in ("padded", "ragged")]
    if args.json:
        print(jsonio.dumps(rows))
        return
    print(f"moe-tiny, 4 MoE layers, expert={args.expert} x data={8 // args.expert}, batch {args.batch} x "
          f"seq {args.seq}; sent rows per step (forward dispatch, all layers); bytes = 4 x rows x d_model x 4")
    print(f"{'top-k':>5} {'exchange':<8} {'copies':>8} {'sent rows':>10} {'MiB/step':>9} {'vs padded':>9}  losses")
    for i in range(0, len(rows), 2):
        padded, ragged = rows[i], rows[i + 1]
        if padded["loss"] != ragged["loss"]:
            diff = max(abs(a - b) / abs(a) for a, b in zip(padded["loss"], ragged["loss"]))
            print(f"  (losses differ by up to {diff:.2e} relative)")
        for r in (padded, ragged):
            ratio = r["sent_rows"][-1] / padded["sent_rows"][-1]
            print(f"{r['top_k']:>5} {r['exchange']:<8} {r['copies']:>8} {r['sent_rows'][-1]:>10.0f} "
                  f"{r['bytes_per_step'][-1] / 2**20:>9.2f} {ratio:>9.3f}  "
                  + " ".join(f"{v:.6f}" for v in r["loss"]))


if __name__ == "__main__":
    main()
