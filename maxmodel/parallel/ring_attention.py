"""Context-parallel attention over one mesh axis (default `sequence`): ring and all-gather.

Both functions take global arrays whose length dimension is sharded over `axis_name` and return the
attention output with the same sharding. Only `axis_name` is manual inside `jax.shard_map`; batch and head
dimensions may additionally be sharded over other mesh axes (data, fsdp, tensor), which the compiler keeps.

Masking is computed from token positions and segment ids, never from array indices: query i attends to key j
iff both are in the same non-zero segment and, when causal, pos_i >= pos_j (and, with a sliding window,
pos_i - pos_j < window). So the tokens may come in any order, which is what makes the load-balancing
permutation below free: permute tokens, positions, segment ids and targets the same way and the loss, a sum
over tokens, does not change. Segment id 0 marks padding: padding attends to nothing and is attended by
nothing; its output is 0 (never NaN).

Schedules
---------
* all-gather (`allgather_attention`): each device gathers the full K/V ([B, L, KVH, D]) and attends its
  own query block against it. One collective, simple; per-device memory holds the whole K/V sequence and
  a [Lq, L] score block, so it stops scaling when L grows.
* ring (`ring_attention`): device i starts with its own K/V block; in n steps the blocks travel around the
  ring with `ppermute` (i -> i+1), and each step folds one [Lq, Lq] score block into a running online
  softmax (running max m, running sum l, f32 accumulator), as in blockwise/flash attention. The next block's
  transfer is issued before the current block's compute so XLA can overlap them. Per-device memory is
  O(L/n) for K/V and O((L/n)^2) for scores. For the backward pass the score block is recomputed
  (`jax.checkpoint` around each block), so only the carries (m, l, accumulator, K/V block) are kept per step.

Causal load balancing
---------------------
With a causal mask and the natural order, device n-1 has n blocks of useful work and device 0 one. The
"zigzag" order splits the sequence into 2n chunks and gives device i chunks i and 2n-1-i, so every device
has the same number of unmasked (q, k) pairs. Fully masked blocks are skipped with `lax.cond`, so the
balance turns into wall-clock time on real hardware.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from maxmodel.parallel.manual_axes import resolve_mesh, varying_axes

# A large finite negative instead of -inf keeps exp() and its gradient free of inf - inf = NaN.
_NEG = -0.7 * float(np.finfo(np.float32).max)


# ----------------------------------------------------------------------------------------------- mask
def attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, causal=True,
                   sliding_window=0):
    """Boolean mask [B, Lq, Lk]: same non-zero segment, causal and windowed by position."""
    qs, ks = q_segment_ids[:, :, None], kv_segment_ids[:, None, :]
    mask = (qs == ks) & (qs != 0)
    dist = q_positions[:, :, None] - kv_positions[:, None, :]
    if causal:
        mask &= dist >= 0
    if sliding_window:
        mask &= jnp.abs(dist) < sliding_window
    return mask


def reference_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
                        causal=True, scale=None, sliding_window=0, logit_softcap=0.0):
    """Dense masked softmax attention on whole arrays (no sharding logic); the ground truth in tests."""
    _check_shapes(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    B, Lq, H, D = q.shape
    kvh = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    rep = H // kvh
    k = jnp.repeat(k, rep, axis=2)
    v = jnp.repeat(v, rep, axis=2)
    s = jnp.einsum("bqhd,bshd->bhqs", q, k, preferred_element_type=jnp.float32) * scale
    if logit_softcap:
        s = logit_softcap * jnp.tanh(s / logit_softcap)
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal=causal,
                          sliding_window=sliding_window)[:, None]
    p = jax.nn.softmax(jnp.where(mask, s, _NEG), axis=-1)
    p = p * jnp.any(mask, axis=-1, keepdims=True)  # rows with no visible key (padding) -> 0
    out = jnp.einsum("bhqs,bshd->bqhd", p, v.astype(jnp.float32))
    return out.astype(q.dtype)


# ---------------------------------------------------------------------------------- blockwise softmax
def _init_stats(q, kvh):
    B, Lq, H, D = q.shape
    g = H // kvh
    m = jnp.full((B, kvh, g, Lq), _NEG, jnp.float32)
    l = jnp.zeros((B, kvh, g, Lq), jnp.float32)
    acc = jnp.zeros((B, kvh, g, Lq, D), jnp.float32)
    return m, l, acc


def _fold_block(stats, q, k, v, mask, scale, logit_softcap):
    """Fold one K/V block into the running (max, sum, accumulator) of the online softmax."""
    m, l, acc = stats
    B, Lq, H, D = q.shape
    kvh = k.shape[2]
    qg = q.reshape(B, Lq, kvh, H // kvh, D)  # GQA: query heads grouped under their KV head
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * scale
    if logit_softcap:
        s = logit_softcap * jnp.tanh(s / logit_softcap)
    mask = mask[:, None, None]
    s = jnp.where(mask, s, _NEG)
    # The result does not depend on the max mathematically, so it carries no gradient.
    m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(-1)))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    l = l * corr + p.sum(-1)
    pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc = acc * corr[..., None] + pv
    return m_new, l, acc


def _finish(stats, q):
    _, l, acc = stats
    B, Lq, H, D = q.shape
    out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]  # l == 0: nothing visible (padding)
    out = jnp.moveaxis(out, 3, 1)  # [B, KVH, G, Lq, D] -> [B, Lq, KVH, G, D]
    return out.reshape(B, Lq, H, D).astype(q.dtype)


# ------------------------------------------------------------------------------------- local kernels
def _ring_local(q, k, v, qs, ks, qp, kp, *, axis_name, n, causal, scale, sliding_window, logit_softcap):
    perm = [(i, (i + 1) % n) for i in range(n)]

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def fold(stats, kv):
        k_blk, v_blk, ks_blk, kp_blk = kv
        mask = attention_mask(qs, ks_blk, qp, kp_blk, causal=causal, sliding_window=sliding_window)
        # Skip blocks with nothing visible (half of them under a causal mask).
        return jax.lax.cond(jnp.any(mask),
                            lambda st: _fold_block(st, q, k_blk, v_blk, mask, scale, logit_softcap),
                            lambda st: st, stats)

    def step(carry, _):
        stats, kv = carry
        nxt = jax.lax.ppermute(kv, axis_name, perm)  # issued first so the transfer overlaps the compute
        return (fold(stats, kv), nxt), None

    # The carries vary over the ring axis (and any axis the inputs vary over, e.g. `stage` when called
    # inside a pipeline stage) from the first fold on; say so up front for scan/cond typing.
    vary = tuple(sorted({axis_name, *varying_axes(q, k, v, qs, ks, qp, kp)}))
    stats = jax.lax.pcast(_init_stats(q, k.shape[2]), vary, to="varying")
    kv = (k, v, ks, kp)
    if n > 1:
        (stats, kv), _ = jax.lax.scan(step, (stats, kv), None, length=n - 1)
    stats = fold(stats, kv)  # the last block needs no onward transfer
    return _finish(stats, q)


def _allgather_local(q, k, v, qs, ks, qp, kp, *, axis_name, n, causal, scale, sliding_window,
                     logit_softcap):
    k, v, ks, kp = (jax.lax.all_gather(a, axis_name, axis=1, tiled=True) for a in (k, v, ks, kp))
    mask = attention_mask(qs, ks, qp, kp, causal=causal, sliding_window=sliding_window)
    stats = _fold_block(_init_stats(q, k.shape[2]), q, k, v, mask, scale, logit_softcap)
    return _finish(stats, q)


# ------------------------------------------------------------------------------------------ public API


def _check_shapes(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, L, H, D] and k, v [B, L, KVH, D]; got q{q.shape} k{k.shape} "
                         f"v{v.shape}")
    B, Lq, H, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[2]:
        raise ValueError(f"q{q.shape} and k{k.shape} disagree: need the same batch and head_dim and "
                         f"num_heads={H} divisible by num_kv_heads={k.shape[2]}")
    for name, a, ref in (("q_segment_ids", q_segment_ids, q), ("q_positions", q_positions, q),
                         ("kv_segment_ids", kv_segment_ids, k), ("kv_positions", kv_positions, k)):
        if a.shape != ref.shape[:2]:
            raise ValueError(f"{name} has shape {a.shape}, expected {ref.shape[:2]}")


def _context_parallel(local_fn, q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
                      mesh, axis_name, causal, scale, sliding_window, logit_softcap):
    _check_shapes(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    mesh = resolve_mesh(mesh)
    if axis_name not in mesh.axis_names:
        raise ValueError(f"mesh axis {axis_name!r} not in mesh axes {mesh.axis_names}")
    n = mesh.shape[axis_name]
    for name, length in (("q", q.shape[1]), ("kv", k.shape[1])):
        if length % n:
            raise ValueError(f"{name} length {length} is not divisible by mesh axis {axis_name}={n}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seq4, seq2 = P(None, axis_name, None, None), P(None, axis_name)
    fn = functools.partial(local_fn, axis_name=axis_name, n=n, causal=causal, scale=scale,
                           sliding_window=sliding_window, logit_softcap=logit_softcap)
    # Only `axis_name` is manual: batch / head shardings on other axes stay with the compiler.
    return jax.shard_map(fn, mesh=mesh, in_specs=(seq4, seq4, seq4, seq2, seq2, seq2, seq2),
                         out_specs=seq4, axis_names={axis_name})(
        q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)


def ring_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, mesh=None,
                   axis_name="sequence", causal=True, scale=None, sliding_window=0, logit_softcap=0.0):
    """Ring attention: K/V blocks circulate over `axis_name` with ppermute; blockwise online softmax.

    q [B, L, H, D]; k, v [B, L, KVH, D] (H a multiple of KVH); segment ids / positions [B, L] int32.
    L is sharded over `axis_name` of `mesh` (default: the mesh set with `jax.set_mesh`). Returns [B, L, H, D] in q's dtype, sharded like q.
    """
    return _context_parallel(_ring_local, q, k, v, q_segment_ids, kv_segment_ids, q_positions,
                             kv_positions, mesh=mesh, axis_name=axis_name, causal=causal, scale=scale,
                             sliding_window=sliding_window, logit_softcap=logit_softcap)


def allgather_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, mesh=None,
                        axis_name="sequence", causal=True, scale=None, sliding_window=0, logit_softcap=0.0):
    """All-gather K/V over `axis_name`, then attend the local query block. Same contract as ring."""
    return _context_parallel(_allgather_local, q, k, v, q_segment_ids, kv_segment_ids, q_positions,
                             kv_positions, mesh=mesh, axis_name=axis_name, causal=causal, scale=scale,
                             sliding_window=sliding_window, logit_softcap=logit_softcap)


# --------------------------------------------------------------------------------- load balancing
def load_balance_permutation(seq_len: int, num_shards: int) -> np.ndarray:
    """Token order for causal load balancing: `x_balanced = x[:, perm]`.

    The sequence is cut into 2·n equal chunks; shard i receives chunks i and 2n-1-i (one early, one late),
    so each shard has the same count of causally visible (q, k) pairs.
    """
    if num_shards < 1 or seq_len % (2 * num_shards):
        raise ValueError(f"seq_len={seq_len} must be divisible by 2 * num_shards={2 * num_shards} "
                         "for causal load balancing")
    chunks = np.arange(seq_len).reshape(2 * num_shards, -1)
    order = [c for i in range(num_shards) for c in (i, 2 * num_shards - 1 - i)]
    return chunks[order].reshape(-1)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """`x == x[:, perm][:, inverse_permutation(perm)]`."""
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    return inv
