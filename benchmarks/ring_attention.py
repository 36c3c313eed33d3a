"""Context-parallel attention timings on emulated CPU devices: ring vs all-gather, natural vs zigzag order.

    python benchmarks/ring_attention.py [--seq 1024] [--shards 4] [--batch 2] [--heads 8] [--kv-heads 2]
                                        [--head-dim 64] [--docs 1] [--iters 5]

Prints milliseconds per call (median of --iters after one warm-up) for the forward pass and for forward +
backward, for: all-gather, ring in natural order, ring in zigzag order, and dense attention on one device.
On emulated devices all "devices" share the host's cores, so this measures total work and collective
overhead rather than the per-device balance a real accelerator mesh would show.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--docs", type=int, default=1, help="documents packed per row")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)

    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.shards}")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from maxmodel.parallel.ring_attention import (
        allgather_attention,
        load_balance_permutation,
        reference_attention,
        ring_attention,
    )

    if jax.device_count() < args.shards:
        print(f"need {args.shards} devices, found {jax.device_count()} (JAX initialised earlier?)")
        return 2
    B, L, H, KVH, D = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, L, H, D)).astype(np.float32)
    k = rng.normal(size=(B, L, KVH, D)).astype(np.float32)
    v = rng.normal(size=(B, L, KVH, D)).astype(np.float32)
    doc_len = L // args.docs
    seg = np.broadcast_to(1 + np.arange(L) // doc_len, (B, L)).astype(np.int32)
    pos = np.broadcast_to(np.arange(L) % doc_len, (B, L)).astype(np.int32)
    mesh = jax.make_mesh((args.shards,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:args.shards])

    def timed(fn, *xs):
        jax.block_until_ready(fn(*xs))  # compile + warm up
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            jax.block_until_ready(fn(*xs))
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)

    def variants():
        natural = np.arange(L)
        zigzag = load_balance_permutation(L, args.shards)
        yield "allgather", allgather_attention, natural, True
        yield "ring (natural order)", ring_attention, natural, True
        yield "ring (zigzag order)", ring_attention, zigzag, True
        yield "dense, 1 device", None, natural, False

    print(f"B={B} L={L} H={H} KVH={KVH} D={D} docs/row={args.docs} shards={args.shards} "
          f"({jax.devices()[0].platform}, host cores: {os.cpu_count()})")
    print(f"{'variant':24s} {'forward ms':>11s} {'fwd+bwd ms':>11s}")
    for name, attend, perm, sharded in variants():
        xs = [a[:, perm] for a in (q, k, v, seg, pos)]
        if sharded:
            s4, s2 = NamedSharding(mesh, P(None, "sequence")), NamedSharding(mesh, P(None, "sequence"))
            xs = [jax.device_put(a, s4 if a.ndim == 4 else s2) for a in xs]

            def fwd(q, k, v, seg, pos, attend=attend):
                return attend(q, k, v, seg, seg, pos, pos, mesh=mesh)
        else:
            def fwd(q, k, v, seg, pos):
                return reference_attention(q, k, v, seg, seg, pos, pos)

        grad = jax.jit(jax.grad(lambda *a, fwd=fwd: jnp.sum(fwd(*a) ** 2), argnums=(0, 1, 2)))
        print(f"{name:24s} {timed(jax.jit(fwd), *xs):11.2f} {timed(grad, *xs):11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
