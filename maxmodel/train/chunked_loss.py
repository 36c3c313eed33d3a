"""Cross-entropy fused with the output projection, over chunks of the sequence (`train.loss_chunk`).

With a 32k vocabulary the [B, L, V] float32 logits, their softmax and its gradient are the largest arrays of
a small model's step (512 MB each at B·L = 4096). Here the gradient of the loss is computed in the forward
pass itself, one chunk of positions at a time: logits -> log-sum-exp -> (softmax - one-hot) -> the chunk's
contributions to d(hidden) and d(head), accumulated; the backward pass only scales them by the incoming
cotangent. Same FLOPs as the materialised path (no recomputation), and no array larger than
[B, chunk, V] is ever alive.

The loss value returned for differentiation is nll + z_loss·log_z²; the plain nll sum is returned beside it
as a statistic that carries no gradient (the trainer differentiates the total and reports the nll).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from maxmodel.models.layers import dense, matmul_tn


def _chunks(x, chunk):
    """[B, L, ...] -> [L/chunk, B, chunk, ...]: the scan runs over positions; the batch stays sharded."""
    b, length = x.shape[:2]
    return jnp.swapaxes(x.reshape(b, length // chunk, chunk, *x.shape[2:]), 0, 1)


def _unchunk(x):
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _chunk_stats(h, w, targets, mask, z_loss):
    """One chunk: logits [B, C, V] in float32, their log-sum-exp and the masked loss terms."""
    logits = dense(h, w, preferred_element_type=jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = ((log_z - target_logit) * mask).sum()
    z = (z_loss * jnp.square(log_z) * mask).sum()
    return logits, log_z, nll, z


def _sums_only(h, w, targets, mask, z_loss, chunk):
    def body(acc, xs):
        _, _, nll, z = _chunk_stats(xs[0], w, xs[1], xs[2], z_loss)
        return (acc[0] + nll, acc[1] + z), None
    (nll, z), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)),
                               (_chunks(h, chunk), _chunks(targets, chunk), _chunks(mask, chunk)))
    return nll + z, nll


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fused_cross_entropy(h, w, targets, mask, z_loss: float, chunk: int):
    """(nll + z-loss sum, nll sum) of hidden states h [B, L, D] against the head w [D, V].

    Differentiable in h and w through the first output only."""
    return _sums_only(h, w, targets, mask, z_loss, chunk)


def _fwd(h, w, targets, mask, z_loss, chunk):
    def body(carry, xs):
        nll_acc, z_acc, dw = carry
        hc, tc, mc = xs
        logits, log_z, nll, z = _chunk_stats(hc, w, tc, mc, z_loss)
        # d(nll + z_loss·log_z²)/d(logits) = softmax·(1 + 2·z_loss·log_z) - one_hot(target), masked
        probs = jnp.exp(logits - log_z[..., None])
        scale = (mc * (1.0 + 2.0 * z_loss * log_z))[..., None]
        dlogits = probs * scale - jax.nn.one_hot(tc, logits.shape[-1], dtype=jnp.float32) * mc[..., None]
        dlogits = dlogits.astype(hc.dtype)
        rows = hc.shape[0] * hc.shape[1]  # 2-D products: see models.layers.dense
        h2, d2 = hc.reshape(rows, -1), dlogits.reshape(rows, -1)
        # dlogits @ w.T as one contraction of both last dims: spelt `dense(dlogits, w.T)`, the bf16 product
        # ran at a third of the rate on XLA:CPU (the fused loss 1.2 s -> 0.76 s, benchmarks/RESULTS.md)
        dh = jax.lax.dot_general(d2, w.astype(hc.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        dw = dw + matmul_tn(h2, d2)  # bf16 on CPU: see matmul_tn
        return (nll_acc + nll, z_acc + z, dw), dh.reshape(hc.shape).astype(h.dtype)
    init = (jnp.float32(0), jnp.float32(0), jnp.zeros(w.shape, jnp.float32))
    (nll, z, dw), dh = jax.lax.scan(body, init, (_chunks(h, chunk), _chunks(targets, chunk), _chunks(mask, chunk)))
    return (nll + z, nll), (_unchunk(dh), dw.astype(w.dtype))


def _bwd(z_loss, chunk, residuals, cotangents):
    dh, dw = residuals
    g_total, _ = cotangents  # the nll statistic carries no gradient (see the module docstring)
    return (g_total * dh).astype(dh.dtype), (g_total * dw).astype(dw.dtype), None, None


fused_cross_entropy.defvjp(_fwd, _bwd)


def chunked_token_logps(h, w, targets, mask, chunk: int):
    """log p(target) [B, L] float32 (0 where mask is 0) of hidden states h [B, L, D] against the head w [D, V],
    one chunk of positions at a time: preference and RL objectives need per-token log-probs, not a sum. Each
    chunk's logits are recomputed in the backward pass (jax.checkpoint), so no [B, L, V] array is ever alive."""
    @jax.checkpoint
    def one(hc, tc):
        logits = dense(hc, w, preferred_element_type=jnp.float32)
        return jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)

    def body(_, xs):
        return None, one(*xs)
    _, out = jax.lax.scan(body, None, (_chunks(h, chunk), _chunks(targets, chunk)))
    return jnp.where(mask > 0, _unchunk(out), 0.0)
