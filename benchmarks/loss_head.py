"""The output head + cross-entropy alone, forward and backward: materialised [B, L, V] float32 logits vs
the fused chunked path (train.loss_chunk). Default shape: bench-50m (B 8, L 512, d_model 512, vocab 32768).

  python benchmarks/loss_head.py [--chunks 0,64,128,256] [--dtype bfloat16] [--repeats 3]
Prints one JSON line per variant: median seconds, GFLOP/s (6·B·L·D·V per step) and XLA's temp memory."""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from maxmodel import jsonio
from maxmodel.train.chunked_loss import fused_cross_entropy
from maxmodel.train.loss import cross_entropy_sums

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--shape", default="8,512,512,32768", help="B,L,D,V")
parser.add_argument("--chunks", default="0,128", help="0 = materialised logits")
parser.add_argument("--dtype", default="float32", help="activations and head (float32 or bfloat16)")
parser.add_argument("--repeats", type=int, default=3)
args = parser.parse_args()
b, length, d, v = map(int, args.shape.split(","))
k = jax.random.split(jax.random.key(0), 3)
h = jax.random.normal(k[0], (b, length, d), args.dtype)
w = (jax.random.normal(k[1], (d, v)) * 0.02).astype(args.dtype)
targets = jax.random.randint(k[2], (b, length), 0, v)
mask = jnp.ones((b, length))


def loss_fn(chunk):
    if chunk:
        return lambda h, w: fused_cross_entropy(h, w, targets, mask, 0.0, chunk)[0]
    return lambda h, w: cross_entropy_sums((h @ w).astype(jnp.float32), targets, mask)[0]


for chunk in map(int, args.chunks.split(",")):
    loss = loss_fn(chunk)
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = f.lower(h, w).compile()
    jax.block_until_ready(compiled(h, w))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(h, w))
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    print(jsonio.dumps({"chunk": chunk, "dtype": args.dtype, "seconds": t, "gflops": 6 * b * length * d * v / t / 1e9,
                        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}), flush=True)
