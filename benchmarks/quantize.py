"""Weight quantization and the int8 KV cache on the ~50M model of configs/experiments/bench-50m.yaml.

  PYTHONPATH=. .venv/bin/python benchmarks/quantize.py [--train-steps 30] [--kv-batch 16 --kv-len 2048]

Prints one JSON object: weight bytes (whole tree and linear weights only) float / int8 / int4, KV-cache bytes
float vs int8 for kv-batch x kv-len, logit error against float on held-out text (max and mean |Δ| relative to
the std of the float logits, top-1 agreement), and the time of one decode step (batch 1, one new token,
a 512-slot cache) for each weight format, with the machine's load average.

The model is first trained for --train-steps Adam steps on the built-in corpus read as UTF-8 bytes (ids
< 256), so that its logits carry some signal (0 = random weights).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maxmodel.config import load_config
from maxmodel.data.builtin import builtin_documents, split_documents
from maxmodel.inference.quantize import quantize_params, weight_bytes
from maxmodel.models.transformer import Transformer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "bench-50m.yaml"


def byte_rows(docs: list[str], rows: int, length: int, rng) -> np.ndarray:
    data = np.frombuffer("\n\n".join(docs).encode(), np.uint8).astype(np.int32)
    starts = rng.integers(0, len(data) - length, rows)
    return np.stack([data[s:s + length] for s in starts])


def train(graphdef, params, docs, steps: int, seq: int = 128, batch: int = 8):
    tx = optax.adam(1e-3)

    @jax.jit
    def step(params, opt, tokens):
        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value
    opt, rng, value = tx.init(params), np.random.default_rng(0), float("nan")
    for _ in range(steps):
        params, opt, value = step(params, opt, jnp.asarray(byte_rows(docs, batch, seq + 1, rng)))
    return params, float(value)


def time_calls(fn, *args, n: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--kv-batch", type=int, default=16)
    ap.add_argument("--kv-len", type=int, default=2048)
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args(argv)

    cfg = load_config(str(CONFIG), [])
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    train_docs, held_out = split_documents(builtin_documents(), 0.05)
    t0 = time.perf_counter()
    params, loss = train(graphdef, params, train_docs, args.train_steps)
    train_s = time.perf_counter() - t0
    trees = {"float32": params, "int8": quantize_params(cfg, params, "int8"),
             "int4": quantize_params(cfg, params, "int4", args.group_size)}

    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    text = jnp.asarray(byte_rows(held_out, 4, 512, np.random.default_rng(1)))
    ref = forward(params, text)
    errors = {}
    for name in ("int8", "int4"):
        out = forward(trees[name], text)
        diff = jnp.abs(out - ref) / jnp.std(ref)
        errors[name] = {"max_abs_rel": float(diff.max()), "mean_abs_rel": float(diff.mean()),
                        "top1_agreement": float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(ref, -1)))}

    def step(p, token, cache):
        model = nnx.merge(graphdef, p)
        h, cache = model.decode(token, jnp.full((1, 1), 300), jnp.full((1,), 300), cache)
        return model.logits(h), cache
    step = jax.jit(step)
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(1, 512)
    token = jnp.asarray([[65]])
    decode_ms = {name: 1e3 * time_calls(step, tree, token, cache, n=args.calls) for name, tree in trees.items()}
    q_cache = model.init_cache(1, 512, quantized=True)
    decode_ms["int8_weights_int8_kv"] = 1e3 * time_calls(step, trees["int8"], token, q_cache, n=args.calls)

    kv_f = jax.eval_shape(lambda: model.init_cache(args.kv_batch, args.kv_len))
    kv_q = jax.eval_shape(lambda: model.init_cache(args.kv_batch, args.kv_len, quantized=True))
    kv_bytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    result = {
        "model": "bench-50m", "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "train_steps": args.train_steps, "train_loss": loss, "train_s": round(train_s, 1),
        "weight_bytes": {k: weight_bytes(t) for k, t in trees.items()},
        "linear_weight_bytes": {k: weight_bytes(t, cfg) for k, t in trees.items()},
        "int4_group_size": args.group_size,
        "kv_cache_bytes": {"batch": args.kv_batch, "length": args.kv_len, "float32": kv_bytes(kv_f),
                           "int8": kv_bytes(kv_q), "ratio": kv_bytes(kv_f) / kv_bytes(kv_q)},
        "logit_error_vs_float": errors, "eval_tokens": int(text.size),
        "decode_step_ms": {k: round(v, 2) for k, v in decode_ms.items()},
        "loadavg": Path("/proc/loadavg").read_text().split()[:3], "cpus": os.cpu_count(),
    }
    lw = result["linear_weight_bytes"]
    result["linear_ratio"] = {"int8": lw["float32"] / lw["int8"], "int4": lw["float32"] / lw["int4"]}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
