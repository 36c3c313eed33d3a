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
  O(L/n) for K/V and O((L/n)^2) for scores. The backward pass (a custom VJP) saves only q, k, v, the
  output and the log-sum-exp, and runs a second ring: K/V blocks travel again together with their dK/dV
  accumulators, which after n hops are back on the block's owner; scores are recomputed per block.

Causal load balancing
---------------------
With a causal mask and the natural order, device n-1 has n blocks of useful work and device 0 one. The
"zigzag" order splits the sequence into 2n chunks and gives device i chunks i and 2n-1-i, so every device
has the same number of unmasked (q, k) pairs. To turn that into time, the ring kernel cuts each local block
in two halves and skips (`lax.cond`) every (query half, key half) pair with nothing visible: with zigzag,
each off-diagonal step has exactly 2 of its 4 pairs visible, so every device computes 2n+1 of 4n
quarter-blocks, against 4n-1 for the busiest device in natural order (about 2x less for large n).
The skip test looks at the mask, so it is exact for any order and for packed documents (a step whose
blocks share no document is skipped too).

Composition
-----------
Only `axis_name` is manual, so batch over data/fsdp and heads over tensor pass through. Called inside a
shard_map in which `axis_name` is already manual (a pipeline stage built with
`pipeline_apply(..., length_axis="sequence")`), the functions take and return local blocks and run the
per-device kernels directly. (Nesting a second shard_map there lowers in the forward pass but fails under
autodiff when the outer region contains a scan, in JAX 0.12: "operates on axis ... already bound by a
parent sdy.manual_computation".)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from maxmodel.parallel.manual_axes import resolve_mesh, vary_over, varying_axes

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
    H, D = q.shape[2:]
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
@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static settings of one attention call (hashable: a custom_vjp non-differentiable argument)."""
    mesh: Any
    axis_name: str
    ring: bool
    causal: bool
    scale: float
    sliding_window: int
    logit_softcap: float
    already_manual: bool  # called inside a shard_map that has `axis_name` manual: arrays are local blocks

    @property
    def size(self):
        return self.mesh.shape[self.axis_name]


def _grouped(a, kvh):  # [B, L, H, D] -> [B, L, KVH, G, D]: GQA query heads under their KV head
    B, L, H, D = a.shape
    return a.reshape(B, L, kvh, H // kvh, D)


def _scores(qg, k, spec):
    """Logits [B, KVH, G, Lq, Lk] in f32, and the softcap's tanh (for its derivative) or None."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * spec.scale
    if not spec.logit_softcap:
        return s, None
    t = jnp.tanh(s / spec.logit_softcap)
    return spec.logit_softcap * t, t


def _init_stats(q, kvh):
    B, Lq, H, D = q.shape
    g = H // kvh
    m = jnp.full((B, kvh, g, Lq), _NEG, jnp.float32)
    l = jnp.zeros((B, kvh, g, Lq), jnp.float32)
    acc = jnp.zeros((B, kvh, g, Lq, D), jnp.float32)
    return m, l, acc


def _fold_block(stats, q, k, v, mask, spec):
    """Fold one K/V block into the running (max, sum, accumulator) of the online softmax."""
    m, l, acc = stats
    s, _ = _scores(_grouped(q, k.shape[2]), k, spec)
    mask = mask[:, None, None]
    s = jnp.where(mask, s, _NEG)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    l = l * corr + p.sum(-1)
    pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l, acc * corr[..., None] + pv


def _finish(stats, q):
    """Output [B, Lq, H, D] and log-sum-exp [B, KVH, G, Lq] (kept for the backward pass)."""
    m, l, acc = stats
    B, Lq, H, D = q.shape
    visible = l > 0.0  # l == 0: nothing visible (padding): output 0
    out = acc / jnp.where(visible, l, 1.0)[..., None]
    out = jnp.moveaxis(out, 3, 1).reshape(B, Lq, H, D).astype(q.dtype)
    lse = jnp.where(visible, m + jnp.log(jnp.where(visible, l, 1.0)), 0.0)
    return out, lse


def _grad_block(q, k, v, do, lse, delta, mask, spec):
    """Flash-attention backward for one K/V block: softmax recomputed from the saved log-sum-exp.

    With p = softmax row and dp = do·v: ds = p * (dp - delta), delta = rowsum(do * out).
    Returns dq [B, Lq, KVH, G, D], dk, dv [B, Lk, KVH, D], all f32.
    """
    kvh = k.shape[2]
    qg, dog = _grouped(q, kvh), _grouped(do, kvh)
    s, t = _scores(qg, k, spec)
    mask = mask[:, None, None]
    p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
    dv = jnp.einsum("bkgqs,bqkgd->bskd", p.astype(do.dtype), dog, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bqkgd,bskd->bkgqs", dog, v, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None])
    if t is not None:
        ds = ds * (1.0 - t * t)  # d(cap * tanh(x / cap)) / dx
    ds = ds * spec.scale
    dq = jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(q.dtype), qg, preferred_element_type=jnp.float32)
    return dq, dk, dv


# ------------------------------------------------------------------------------------- local kernels
# These run per device inside shard_map: q, k, v, ids are this device's blocks along the sequence.
def _varying(spec, tree, *refs):
    """Mark fresh loop carries as varying over the ring axis and every manual axis the inputs vary over
    (e.g. `stage` when called inside a pipeline stage), as scan/cond typing under shard_map requires."""
    return vary_over(tree, {spec.axis_name, *varying_axes(*refs)})


def _visible(spec, qs, ks, qp, kp):
    return attention_mask(qs, ks, qp, kp, causal=spec.causal, sliding_window=spec.sliding_window)


def _num_chunks(*lengths):
    # Each local block is cut in two halves so that causal skipping works at half-block granularity,
    # which is what the zigzag order needs to pay off (see the module docstring).
    return 2 if all(length % 2 == 0 for length in lengths) else 1


def _split(a, c, axis=1):
    return jnp.split(a, c, axis=axis) if c > 1 else [a]


def _ring_fwd_local(q, k, v, qs, ks, qp, kp, *, spec):
    n, ring = spec.size, [(i, (i + 1) % spec.size) for i in range(spec.size)]
    c = _num_chunks(q.shape[1], k.shape[1])
    q_c, qs_c, qp_c = (_split(a, c) for a in (q, qs, qp))

    def fold(stats, kv):  # stats: one (max, sum, accumulator) per query chunk
        stats = list(stats)
        for j, (k_j, v_j, ks_j, kp_j) in enumerate(zip(*(_split(a, c) for a in kv))):
            for i in range(c):
                mask = _visible(spec, qs_c[i], ks_j, qp_c[i], kp_j)
                update = functools.partial(_fold_block, q=q_c[i], k=k_j, v=v_j, mask=mask, spec=spec)
                # Skip chunk pairs with nothing visible (about half of them under a causal mask).
                stats[i] = jax.lax.cond(jnp.any(mask), update, lambda st: st, stats[i])
        return tuple(stats)

    def step(carry, _):
        stats, kv = carry
        nxt = jax.lax.ppermute(kv, spec.axis_name, ring)  # issued first: the transfer overlaps the compute
        return (fold(stats, kv), nxt), None

    stats = _varying(spec, tuple(_init_stats(q_i, k.shape[2]) for q_i in q_c), q, k, v, qs, ks, qp, kp)
    kv = (k, v, ks, kp)
    if n > 1:
        (stats, kv), _ = jax.lax.scan(step, (stats, kv), None, length=n - 1)
    outs, lses = zip(*(_finish(st, q_i) for st, q_i in zip(fold(stats, kv), q_c)))  # last block: no hop
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=-1)


def _ring_bwd_local(q, k, v, qs, ks, qp, kp, out, lse, do, *, spec):
    """Second ring pass: K/V blocks circulate again, each with its dK/dV accumulator, which after n
    hops is back on the device that owns the block."""
    n, ring = spec.size, [(i, (i + 1) % spec.size) for i in range(spec.size)]
    kvh = k.shape[2]
    c = _num_chunks(q.shape[1], k.shape[1])
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", _grouped(do, kvh).astype(jnp.float32),
                       _grouped(out, kvh).astype(jnp.float32))
    q_c, qs_c, qp_c, do_c = (_split(a, c) for a in (q, qs, qp, do))
    lse_c, delta_c = _split(lse, c, axis=-1), _split(delta, c, axis=-1)

    def accumulate(dq, kv, dkv):  # dq: per query chunk; dkv: (dk, dv) per key chunk
        dq, (dk, dv) = list(dq), (list(dkv[0]), list(dkv[1]))
        for j, (k_j, v_j, ks_j, kp_j) in enumerate(zip(*(_split(a, c) for a in kv))):
            for i in range(c):
                mask = _visible(spec, qs_c[i], ks_j, qp_c[i], kp_j)

                def add(acc, i=i, k_j=k_j, v_j=v_j, mask=mask):
                    gq, gk, gv = _grad_block(q_c[i], k_j, v_j, do_c[i], lse_c[i], delta_c[i], mask, spec)
                    return acc[0] + gq, acc[1] + gk, acc[2] + gv
                dq[i], dk[j], dv[j] = jax.lax.cond(jnp.any(mask), add, lambda acc: acc, (dq[i], dk[j], dv[j]))
        return tuple(dq), (tuple(dk), tuple(dv))

    def step(carry, _):
        dq, kv, dkv = carry
        nxt = jax.lax.ppermute(kv, spec.axis_name, ring)
        dq, dkv = accumulate(dq, kv, dkv)
        return (dq, nxt, jax.lax.ppermute(dkv, spec.axis_name, ring)), None

    zeros_q = tuple(jnp.zeros(_grouped(q_i, kvh).shape, jnp.float32) for q_i in q_c)
    zeros_k = tuple(jnp.zeros(k_j.shape, jnp.float32) for k_j in _split(k, c))
    dq, dkv = _varying(spec, (zeros_q, (zeros_k, zeros_k)), q, k, v, qs, ks, qp, kp, do)
    kv = (k, v, ks, kp)
    if n > 1:
        (dq, kv, dkv), _ = jax.lax.scan(step, (dq, kv, dkv), None, length=n - 1)
    dq, dkv = accumulate(dq, kv, dkv)
    dk, dv = jax.lax.ppermute(dkv, spec.axis_name, ring) if n > 1 else dkv  # the n-th hop: home
    dq = jnp.concatenate(dq, axis=1).reshape(q.shape)
    dk, dv = (jnp.concatenate(g, axis=1) for g in (dk, dv))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _gather_kv(spec, *arrays):
    return [jax.lax.all_gather(a, spec.axis_name, axis=1, tiled=True) for a in arrays]


def _allgather_fwd_local(q, k, v, qs, ks, qp, kp, *, spec):
    k, v, ks, kp = _gather_kv(spec, k, v, ks, kp)
    stats = _init_stats(q, k.shape[2])
    return _finish(_fold_block(stats, q, k, v, _visible(spec, qs, ks, qp, kp), spec), q)


def _allgather_bwd_local(q, k, v, qs, ks, qp, kp, out, lse, do, *, spec):
    kvh = k.shape[2]
    k_all, v_all, ks, kp = _gather_kv(spec, k, v, ks, kp)
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", _grouped(do, kvh).astype(jnp.float32),
                       _grouped(out, kvh).astype(jnp.float32))
    dq, dk, dv = _grad_block(q, k_all, v_all, do, lse, delta, _visible(spec, qs, ks, qp, kp), spec)
    # Each device holds gradients for the whole K/V sequence; sum them and keep this device's block.
    dk, dv = (jax.lax.psum_scatter(g, spec.axis_name, scatter_dimension=1, tiled=True) for g in (dk, dv))
    return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# ------------------------------------------------------------------------------------- custom VJP
def _shard_map(spec, fn, in_specs, out_specs):
    if spec.already_manual:
        return functools.partial(fn, spec=spec)
    # Only `axis_name` is manual: batch / head shardings on other axes stay with the compiler.
    return jax.shard_map(functools.partial(fn, spec=spec), mesh=spec.mesh, in_specs=in_specs,
                         out_specs=out_specs, axis_names={spec.axis_name})


def _layout(spec):
    a = spec.axis_name
    return P(None, a, None, None), P(None, a), P(None, None, None, a)  # [B,L,H,D], [B,L], lse [B,K,G,L]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(spec, q, k, v, qs, ks, qp, kp):
    return _attend_fwd(spec, q, k, v, qs, ks, qp, kp)[0]


def _attend_fwd(spec, q, k, v, qs, ks, qp, kp):
    seq4, seq2, lse_spec = _layout(spec)
    local = _ring_fwd_local if spec.ring else _allgather_fwd_local
    out, lse = _shard_map(spec, local, (seq4,) * 3 + (seq2,) * 4, (seq4, lse_spec))(q, k, v, qs, ks, qp, kp)
    return out, (q, k, v, qs, ks, qp, kp, out, lse)


def _attend_bwd(spec, residuals, do):
    seq4, seq2, lse_spec = _layout(spec)
    local = _ring_bwd_local if spec.ring else _allgather_bwd_local
    in_specs = (seq4,) * 3 + (seq2,) * 4 + (seq4, lse_spec, seq4)
    dq, dk, dv = _shard_map(spec, local, in_specs, (seq4,) * 3)(*residuals, do)
    return dq, dk, dv, None, None, None, None  # segment ids and positions: no gradient


# A custom VJP rather than autodiff through the loop: the backward pass is a second ring, with memory
# O(block) instead of one saved score block per step.
_attend.defvjp(_attend_fwd, _attend_bwd)


# ------------------------------------------------------------------------------------------ public API


def _check_shapes(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, L, H, D] and k, v [B, L, KVH, D]; got q{q.shape} k{k.shape} "
                         f"v{v.shape}")
    B, _, H, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[2]:
        raise ValueError(f"q{q.shape} and k{k.shape} disagree: need the same batch and head_dim and "
                         f"num_heads={H} divisible by num_kv_heads={k.shape[2]}")
    for name, a, ref in (("q_segment_ids", q_segment_ids, q), ("q_positions", q_positions, q),
                         ("kv_segment_ids", kv_segment_ids, k), ("kv_positions", kv_positions, k)):
        if a.shape != ref.shape[:2]:
            raise ValueError(f"{name} has shape {a.shape}, expected {ref.shape[:2]}")


def _context_parallel(ring, q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, mesh,
                      axis_name, causal, scale, sliding_window, logit_softcap):
    _check_shapes(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    mesh = resolve_mesh(mesh)
    if axis_name not in mesh.axis_names:
        raise ValueError(f"mesh axis {axis_name!r} not in mesh axes {mesh.axis_names}")
    # Inside a shard_map that already has `axis_name` manual (e.g. a pipeline stage with
    # `length_axis="sequence"`) the arrays are this device's blocks and the kernels run directly.
    # (A shard_map nested in a scan inside another shard_map fails to lower under autodiff in JAX 0.12.)
    already_manual = axis_name in getattr(mesh, "manual_axes", ())
    n = mesh.shape[axis_name]
    for name, length in (("q", q.shape[1]), ("kv", k.shape[1])):
        if length % n and not already_manual:
            raise ValueError(f"{name} length {length} is not divisible by mesh axis {axis_name}={n}")
    spec = _Spec(mesh=mesh, axis_name=axis_name, ring=ring, causal=bool(causal),
                 scale=float(q.shape[-1] ** -0.5 if scale is None else scale),
                 sliding_window=int(sliding_window), logit_softcap=float(logit_softcap),
                 already_manual=already_manual)
    return _attend(spec, q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)


def ring_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, mesh=None,
                   axis_name="sequence", causal=True, scale=None, sliding_window=0, logit_softcap=0.0):
    """Ring attention: K/V blocks circulate over `axis_name` with ppermute; blockwise online softmax.

    q [B, L, H, D]; k, v [B, L, KVH, D] (H a multiple of KVH); segment ids / positions [B, L] int32.
    L is sharded over `axis_name` of `mesh` (default: the mesh set with `jax.set_mesh`). Returns
    [B, L, H, D] in q's dtype, sharded like q. Inside a shard_map where `axis_name` is already manual, the
    arguments are the local blocks and so is the result.
    """
    return _context_parallel(True, q, k, v, q_segment_ids, kv_segment_ids, q_positions,
                             kv_positions, mesh=mesh, axis_name=axis_name, causal=causal, scale=scale,
                             sliding_window=sliding_window, logit_softcap=logit_softcap)


def allgather_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, mesh=None,
                        axis_name="sequence", causal=True, scale=None, sliding_window=0, logit_softcap=0.0):
    """All-gather K/V over `axis_name`, then attend the local query block. Same contract as ring."""
    return _context_parallel(False, q, k, v, q_segment_ids, kv_segment_ids, q_positions,
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
