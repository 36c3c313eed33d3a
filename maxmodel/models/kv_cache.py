"""Attention against a per-layer key/value cache: the decode side of `attention.Attention`.

One layer's cache is a dict of arrays, head-major so that the score and value products are plain batched
matmuls over the cache as it is stored (no transposing copy of the cache per token):

  k, v: [B, KVH, S, D]           (int8 with per-head scales `k_scale`, `v_scale` [B, KVH, S] when quantized)

A row's cache holds the `lengths[b]` tokens written so far at slot `position % S`. Layers with full attention
have S = the longest sequence served, so slot = position. Sliding-window layers keep only their window (plus
`spare` slots, so that tokens written speculatively and then rejected never overwrite keys still inside the
window): a ring buffer. Which position a slot holds is computed from `lengths`, not stored, and anything at
or past `lengths` is ignored, so rolling a row back (rejected draft tokens, a freed slot) is just lowering
its length.

A call attends T new tokens (one when decoding, a chunk when prefilling or verifying draft tokens) to the
cached ones and to each other. Where nothing still needed can be overwritten (layers keeping every position,
and one-token steps), the chunk is written first and attended in place (`_attend_written`). A chunk on a ring
buffer may need more positions than it keeps: there scores against the cache and against the chunk are
computed apart and share one softmax, and the chunk is written only afterwards.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .sharding import constrain

NEG_INF = -1e30
CACHE_AXES = ("activation_batch", "activation_kv_heads", None, "activation_head_dim")
SCALE_AXES = ("activation_batch", "activation_kv_heads", None)


def cache_slots(max_len: int, window: int, spare: int) -> int:
    """Slots of one layer's cache: the window (+ spare) for sliding-window layers, else the whole length."""
    return min(max_len, window + spare) if window > 0 else max_len


def empty_cache(batch: int, kv_heads: int, slots: int, head_dim: int, dtype, quantized: bool = False) -> dict:
    shape = (batch, kv_heads, slots, head_dim)
    if quantized:
        zeros = jnp.zeros(shape, jnp.int8)
        scale = jnp.zeros(shape[:3], jnp.float32)
        return {"k": zeros, "v": zeros, "k_scale": scale, "v_scale": scale}
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def quantize_heads(x):
    """int8 with one scale per (row, head, position): x ~ q * scale, |q| <= 127."""
    scale = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1) / 127.0
    q = jnp.round(x.astype(jnp.float32) / jnp.where(scale == 0, 1.0, scale)[..., None])
    return q.astype(jnp.int8), scale


def _read(cache, name, dtype):
    if cache[name].dtype == jnp.int8:
        return cache[name].astype(dtype) * cache[f"{name}_scale"][..., None].astype(dtype)
    return cache[name].astype(dtype)


def slot_positions(lengths, slots: int, ring: bool):
    """[B, S]: the position each slot holds for rows of these lengths (negative = empty)."""
    s = jnp.arange(slots)[None, :]
    if not ring:
        return jnp.where(s < lengths[:, None], s, -1)
    last = lengths[:, None] - 1
    return last - jnp.mod(last - s, slots)


def _window_ok(q_pos, k_pos, window):
    if isinstance(window, jax.Array):
        return (window <= 0) | (q_pos - k_pos < window)
    return q_pos - k_pos < window if window else True


def attend(q, k_new, v_new, positions, lengths, cache, window, ring: bool, softcap: float = 0.0):
    """q: [B, T, H, D]; k_new, v_new: [B, T, KVH, D]; positions [B, T] (-1 = padding, never written or
    attended); lengths [B] = tokens already cached. Returns (out [B, T, H, D], the cache with the chunk in)."""
    b, t, h, d = q.shape
    kvh, slots = cache["k"].shape[1], cache["k"].shape[2]
    dtype = q.dtype
    qh = q.reshape(b, t, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4) * jnp.asarray(1.0 / math.sqrt(d), dtype)
    kh, vh = k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3)          # [B, KVH, T, D]
    if t == 1 or not ring:
        return _attend_written(qh, kh, vh, positions, lengths, cache, window, ring, softcap)
    ck, cv = _read(cache, "k", dtype), _read(cache, "v", dtype)
    s_cache = jnp.einsum("bkgtd,bksd->bkgts", qh, ck, preferred_element_type=jnp.float32)
    s_new = jnp.einsum("bkgtd,bkud->bkgtu", qh, kh, preferred_element_type=jnp.float32)
    if softcap:
        s_cache, s_new = softcap * jnp.tanh(s_cache / softcap), softcap * jnp.tanh(s_new / softcap)
    q_pos = positions[:, :, None]                                              # [B, T, 1]
    k_pos = slot_positions(lengths, slots, ring)[:, None, :]                   # [B, 1, S]
    cache_ok = (k_pos >= 0) & _window_ok(q_pos, k_pos, window)
    new_pos = positions[:, None, :]                                            # [B, 1, T]
    new_ok = (new_pos >= 0) & (new_pos <= q_pos) & _window_ok(q_pos, new_pos, window)
    scores = jnp.concatenate([s_cache + jnp.where(cache_ok, 0.0, NEG_INF)[:, None, None],
                              s_new + jnp.where(new_ok, 0.0, NEG_INF)[:, None, None]], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = (jnp.einsum("bkgts,bksd->bkgtd", probs[..., :slots], cv)
           + jnp.einsum("bkgtu,bkud->bkgtd", probs[..., slots:], vh))
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
    return out, write(cache, kh, vh, positions, lengths)


def _attend_written(qh, kh, vh, positions, lengths, cache, window, ring: bool, softcap: float):
    """The chunk is written first and attended in place with the cached tokens, by position. (Reading the old
    cache and scattering into it afterwards made XLA:CPU copy every layer's cache twice per call, since the
    scatter may not overwrite a buffer a dot still reads.) Used where writing first loses nothing: layers
    keeping every position, and one-token steps of a ring buffer, whose slot held position p - S, outside
    the window (S >= window) and so never attended by p anyway."""
    b, kvh, g, t, d = qh.shape
    cache = write(cache, kh, vh, positions, lengths)
    ck, cv = _read(cache, "k", qh.dtype), _read(cache, "v", qh.dtype)
    scores = jnp.einsum("bkgtd,bksd->bkgts", qh, ck, preferred_element_type=jnp.float32)
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    q_pos = positions[:, :, None]                                              # [B, T, 1]
    n_new = jnp.sum(positions >= 0, axis=1)
    k_pos = slot_positions(lengths + n_new, ck.shape[2], ring)[:, None, :]     # [B, 1, S]
    # padding queries (-1) see the cached tokens alone, as on the chunked path
    ok = (k_pos >= 0) & (k_pos <= jnp.maximum(q_pos, lengths[:, None, None] - 1)) & _window_ok(q_pos, k_pos, window)
    probs = jax.nn.softmax(scores + jnp.where(ok, 0.0, NEG_INF)[:, None, None], axis=-1).astype(qh.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, cv)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kvh * g, d), cache


def write(cache, kh, vh, positions, lengths):
    """The chunk's keys/values [B, KVH, T, D] into their slots (position % S). Padding, and in a ring buffer
    the chunk's tokens that later ones of the same chunk overwrite, go to an out-of-range slot (dropped)."""
    slots = cache["k"].shape[2]
    n_new = jnp.sum(positions >= 0, axis=1, keepdims=True)
    keep = (positions >= 0) & (positions >= lengths[:, None] + n_new - slots)
    slot = jnp.where(keep, jnp.mod(positions, slots), slots)                    # [B, T]
    new = {"k": kh, "v": vh}
    if cache["k"].dtype == jnp.int8:
        (new["k"], new["k_scale"]), (new["v"], new["v_scale"]) = quantize_heads(kh), quantize_heads(vh)

    def put(c, x, idx):  # one row: c [KVH, S, ...], x [KVH, T, ...]
        return c.at[:, idx].set(x.astype(c.dtype), mode="drop")
    out = {name: jax.vmap(put)(cache[name], new[name], slot) for name in cache}
    return {name: constrain(x, CACHE_AXES if x.ndim == 4 else SCALE_AXES) for name, x in out.items()}
