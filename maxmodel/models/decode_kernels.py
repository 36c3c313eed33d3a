"""Attention kernels for the one-token decode step, chosen by `model.attention.impl` (as training's are).

The KV cache (kv_cache.py) is head-major and contiguous per row, [B, KVH, S, D], and a decode step attends one
new token per row to the row's `lengths[b]` cached tokens. Two in-tree JAX Pallas kernels take that layout
without copying the cache:

* TPU (`auto` on TPU for a 16-bit cache, or `splash`): `jax.experimental.pallas.ops.tpu.paged_attention`.
  It wants pages `[kv_heads, pages, page, D]` and a page table per sequence. Folding (row, kv head) into the
  kernel's sequence axis makes the contiguous cache exactly that: a free reshape `[B, KVH, S, D] ->
  [1, B*KVH*S/page, page, D]`, one kv head, sequence `b*KVH + h` owning pages `(b*KVH + h)*S/page + arange`,
  and its query heads the G = H/KVH queries of that kv head (GQA/MQA for free, lengths per row, soft-cap
  native). The new token is written into the cache first and the kernel attends `lengths + 1` tokens (one
  token steps always write at position `lengths[b]`: engine, beam search, speculative drafting). The kernel
  reads K/V as bfloat16 (a float32 cache is rounded on load), so `auto` takes it for bfloat16 caches only.
  `ragged_paged_attention` was not used: its cache interleaves K and V heads, `[pages, page, 2*KVH, D]`,
  a copy of the whole cache per step in this layout.
* GPU (`auto` on GPU, or `flash` / `cudnn`): `jax.experimental.pallas.ops.gpu.decode_attention.mqa` per kv head
  on the cache as it lies (`[S, D]` per row and head), with `kv_seq_len = lengths`; it returns the softmax
  residuals (max, sum), with which the new token's own score is merged in exactly, so the cache is written
  afterwards. (cuDNN's `dot_product_attention` wants `[B, S, KVH, D]`: a transposing copy
  of the cache per step; its decode would only pay off with that layout.) No soft-cap in this kernel.

Rule (`unfit`): a kernel runs only for a one-token step (T == 1) on a full-attention layer with a float
cache whose slot count it can tile (a multiple of 16), head_dim a multiple of 128 on TPU (Mosaic's lane
tiling of the kernel's blocks) and a power of two on GPU (Triton's). Everything else takes
`kv_cache.attend` (XLA): prefill / speculative-verify chunks (T > 1), sliding-window ring buffers, int8
caches (the TPU kernel would need its scales broadcast to [.., D] in f32, 4x the int8 cache, per step),
soft-cap on GPU, pipeline stages, and all of CPU under `auto` (bit for bit as before). A forced kernel
(`splash`, `flash`, `cudnn`) falls back the same way rather than refusing, since every engine also
prefills. Off its platform a kernel runs in Pallas interpret mode (how the tests check both against XLA on
CPU). Kernels run under `jax.shard_map`: rows over the batch axes, kv heads over `tensor`, as the logical
rules place the cache.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax.core import spmd
from jax.sharding import PartitionSpec as P

from maxmodel.config.errors import ConfigError
from maxmodel.parallel.mesh import platform  # a module attribute here too: tests monkeypatch it

from . import kv_cache
from .attention_kernels import IMPLS, KEY, LANES, _axes, _rule

KERNEL_OF = {"splash": "tpu", "flash": "gpu", "cudnn": "gpu"}  # forced kernels; `auto` keys on the platform
TILE = 16  # slots must be a multiple of this: bf16 sublane tile (TPU), the GPU kernel's smallest key block


def unfit(kernel: str, *, tokens: int, window: int, quantized: bool, softcap: float, slots: int,
          head_dim: int) -> str | None:
    """Why decode kernel `kernel` ("tpu" | "gpu") does not take this call (None: it does)."""
    if tokens != 1:
        return f"a chunk of {tokens} tokens (prefill, speculative verify): the kernels take one token per row"
    if window:
        return "sliding-window layers keep a ring buffer, whose slots are not in position order"
    if quantized:
        return "the int8 KV cache (`--kv-cache-dtype int8`) is read by the XLA path"
    if kernel == "gpu" and softcap:
        return "the Pallas GPU decode kernel has no logit soft-cap"
    if slots % TILE:
        return f"the cache's {slots} slots are not a multiple of {TILE}"
    if kernel == "gpu" and head_dim & (head_dim - 1):  # Triton's blocks are powers of two
        return f"the GPU kernel needs head_dim a power of two, not {head_dim}"
    if kernel == "tpu" and head_dim % LANES:  # Mosaic refuses the kernel's [G, D] blocks of its [G, 1] outputs
        return f"the TPU kernel needs head_dim a multiple of {LANES}, not {head_dim}"
    return None


def choose(impl: str, *, tokens: int, window: int, quantized: bool, softcap: float, slots: int, head_dim: int,
           dtype, on: str | None = None) -> str:
    """"tpu", "gpu" or "xla" for one layer's decode call. Kernels never refuse: they fall back to XLA."""
    if impl not in IMPLS:
        raise ConfigError(KEY, f"{impl!r} is not one of {', '.join(IMPLS)}")
    mesh = jax.sharding.get_abstract_mesh()
    if impl == "xla" or (not mesh.empty and mesh.manual_axes):  # a pipeline stage: no nested shard_map
        return "xla"
    if impl == "auto":
        kernel = {"tpu": "tpu", "gpu": "gpu"}.get(on or platform())
        if kernel == "tpu" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            kernel = None  # it would round a float32 cache to bfloat16
    else:
        kernel = KERNEL_OF[impl]
    if kernel is None or unfit(kernel, tokens=tokens, window=window, quantized=quantized, softcap=softcap,
                               slots=slots, head_dim=head_dim):
        return "xla"
    return kernel


def attend(impl: str, q, k_new, v_new, positions, lengths, cache, window, ring: bool, softcap: float = 0.0):
    """`kv_cache.attend` (same arguments and results), through a decode kernel where `choose` picks one."""
    slots = cache["k"].shape[2]
    kernel = choose(impl, tokens=q.shape[1], window=int(window), quantized=cache["k"].dtype == jnp.int8,
                    softcap=softcap, slots=slots, head_dim=q.shape[-1], dtype=cache["k"].dtype)
    if kernel == "xla":
        return kv_cache.attend(q, k_new, v_new, positions, lengths, cache, window, ring, softcap)
    b, _, h, d = q.shape
    kvh = cache["k"].shape[1]
    qg = q.reshape(b, kvh, h // kvh, d) * jnp.asarray(1.0 / math.sqrt(d), q.dtype)   # [B, KVH, G, D]
    kh, vh = k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3)               # [B, KVH, 1, D]
    lengths = lengths.astype(jnp.int32)
    valid = positions[:, 0] >= 0
    if kernel == "tpu":
        interpret = platform() != "tpu"
        cache = kv_cache.write(cache, kh, vh, positions, lengths)  # then attend to it, the new token included
        local = functools.partial(_paged, softcap=float(softcap) or None, interpret=interpret)
        out = _per_shard(local, qg, cache["k"], cache["v"], rows=(lengths + valid.astype(jnp.int32),))
    else:
        local = functools.partial(_gpu_decode, interpret=platform() != "gpu")
        out = _per_shard(local, qg, cache["k"], cache["v"], kh, vh, rows=(lengths, valid))
        cache = kv_cache.write(cache, kh, vh, positions, lengths)
    return out.reshape(b, 1, h, d).astype(q.dtype), cache


# ------------------------------------------------------------------------------------------ sharding
def _per_shard(fn, qg, *heads_major, rows):
    """`fn(qg, *heads_major, *rows)` per device: [B, KVH, ...] arrays split over batch and kv-head axes as the
    logical rules say (kv heads only where they divide), `rows` ([B]) over the batch axes."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not spmd.get_logical_axis_rules():
        return fn(qg, *heads_major, *rows)
    sizes, manual = dict(mesh.shape), set(mesh.manual_axes)
    keep = lambda entry: tuple(a for a in _axes(entry) if sizes.get(a, 1) > 1 and a not in manual)
    batch, heads = keep(_rule("activation_batch")), keep(_rule("activation_kv_heads"))
    while batch and qg.shape[0] % math.prod(sizes[a] for a in batch):
        batch = batch[:-1]  # a batch smaller than the batch axes: fewer axes split it, the others repeat it
    while heads and qg.shape[1] % math.prod(sizes[a] for a in heads):
        heads = heads[:-1]  # fewer kv heads than `tensor` shards: every device attends all of them
    spec = lambda names: (names or None) if len(names) != 1 else names[0]
    hm = P(spec(batch), spec(heads), None, None)
    row = P(spec(batch))
    # Every axis manual: Mosaic (TPU) kernels cannot be partitioned by the compiler, even over size-1 axes.
    return jax.shard_map(fn, mesh=mesh, in_specs=(hm, *(hm for _ in heads_major), *(row for _ in rows)),
                         out_specs=hm, axis_names=set(mesh.axis_names) - manual, check_vma=False)(
        qg, *heads_major, *rows)


# ------------------------------------------------------------------------------------------- kernels
def _pow2_divisor(n: int, most: int) -> int:
    size = 1
    while size * 2 <= most and n % (size * 2) == 0:
        size *= 2
    return size


def _paged(qg, ck, cv, klen, *, softcap, interpret):
    """TPU paged attention on a contiguous cache: (row, kv head) pairs as sequences of whole pages."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention
    b, kvh, g, d = qg.shape
    slots = ck.shape[2]
    page = _pow2_divisor(slots, 128)                   # >= TILE by `unfit`
    n = slots // page
    per_block = _pow2_divisor(n, max(512 // page, 1))  # ~512 keys per compute block
    as_pages = lambda c: c.reshape(1, b * kvh * n, page, d)  # free: the cache is contiguous per row and head
    table = jnp.arange(b * kvh * n, dtype=jnp.int32).reshape(b * kvh, n)
    call = functools.partial(paged_attention, attn_logits_soft_cap=softcap, pages_per_compute_block=per_block)
    args = (qg.reshape(b * kvh, g, d), as_pages(ck), as_pages(cv), jnp.repeat(klen, kvh), table)
    if interpret:
        with pltpu.force_tpu_interpret_mode():
            out = call(*args)
    else:
        out = call(*args)
    # A row with nothing to attend (an empty padding slot) gets zeros (the XLA path: a uniform average).
    return jnp.where((jnp.repeat(klen, kvh) > 0)[:, None, None], out, 0).reshape(b, kvh, g, d)


def _gpu_decode(qg, ck, cv, kh, vh, lengths, valid, *, interpret):
    """The Pallas GPU decode kernel on the cached tokens, then the new token's score merged into its softmax."""
    import warnings
    with warnings.catch_warnings():  # JAX points to tokamax; see attention_kernels.py for why not
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import decode_attention
    slots = ck.shape[2]
    splits = _pow2_divisor(slots // TILE, 16)           # up to 16 slices of the keys, each >= TILE long
    block = _pow2_divisor(slots // splits, 128)          # >= TILE
    per_head = lambda q, k, v: decode_attention.mqa(q, k, v, kv_seq_len=lengths, sm_scale=1.0, block_k=block,
                                                    k_splits=splits, interpret=interpret, return_residuals=True)
    o, (l, m) = jax.vmap(per_head, in_axes=1, out_axes=1)(qg, ck, cv)  # o [b, kvh, g, d]; l, m [b, kvh, g]
    s_new = jnp.einsum("bkgd,bkd->bkg", qg, kh[:, :, 0], preferred_element_type=jnp.float32)
    s_new = jnp.where(valid[:, None, None], s_new, kv_cache.NEG_INF)
    top = jnp.maximum(m, s_new)
    w_cache, w_new = l * jnp.exp(m - top), jnp.exp(s_new - top)
    out = (o.astype(jnp.float32) * w_cache[..., None]
           + w_new[..., None] * vh[:, :, 0][:, :, None].astype(jnp.float32)) / (w_cache + w_new)[..., None]
    return out.astype(qg.dtype)
