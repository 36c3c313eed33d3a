"""Fused attention kernels for training and scoring, chosen by `model.attention.impl`.

* `splash` (TPU): JAX's Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`, the
  kernel MaxText uses). Packed documents enter as segment ids, O(L), and the causal / sliding-window mask is
  a static block-sparse pattern, so fully masked blocks are skipped and no [L, L] array ever exists. GQA/MQA
  and logit soft-capping are native to the kernel.
* `cudnn` (GPU): `jax.nn.dot_product_attention(implementation="cudnn")`, bf16/fp16 only, sharded by its own
  partitioning rule. cuDNN has no segment-id input on this API, so packed documents go in as a boolean mask.
* `flash` (GPU): JAX's Pallas (Triton) flash attention, where cuDNN does not apply (float32, soft-caps are
  not supported by either and fall back to XLA). GQA by repeating K/V heads.
* `xla`: `attention.dot_product_attention`, masks built from positions (any token order).
* `auto`: splash on TPU, cuDNN on GPU for 16-bit activations (else flash), XLA on CPU, and XLA wherever the
  chosen kernel does not take the layer's mask (prefix LM, bidirectional windows, soft-caps on GPU).

Pallas kernels run on CPU in interpret mode: that is how the tests check them against the XLA path.

tokamax (Google's Pallas kernel library) was evaluated: its attention API takes packed-document masks as
dense [B, N, T, S] booleans (O(L^2) memory, what splash avoids) and pulls in xprof, tensorboardx and qwix
pins, while JAX ships splash and the Triton flash kernel in-tree.

The kernels are per-device programs: `_per_shard` runs them under `jax.shard_map`, batch over the batch
axes and heads over `tensor` as the logical rules say; the sequence must not be split (context parallelism
has its own ring / all-gather kernels).
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

IMPLS = ("auto", "xla", "splash", "cudnn", "flash")
KEY = "model.attention.impl"
LANES = 128  # TPU vector lanes: splash's key blocks are multiples of this


def unsupported(impl: str, *, causal: bool, window: bool, softcap: float, prefix: bool,
                dtype=None, length: int | None = None) -> str | None:
    """Why kernel `impl` cannot compute this attention exactly (None: it can)."""
    if impl == "xla":
        return None
    if prefix:
        return "the prefix-LM mask (train.objective=prefix_lm) is data-dependent; use model.attention.impl=xla"
    if impl == "splash":
        if length is not None and length % LANES:
            return (f"splash works on blocks of multiples of {LANES} tokens; the sequence length {length} is not "
                    f"one (train.seq_len)")
        return None if causal or not window else "bidirectional sliding windows are not supported by splash"
    if softcap:
        return f"model.attention.logit_softcap is not supported by the {impl} kernel (splash and xla have it)"
    if impl == "flash" and window:
        return "sliding windows are not supported by the Pallas flash kernel (cudnn, splash and xla have them)"
    if impl == "cudnn" and dtype is not None and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return "cuDNN flash attention takes bfloat16 / float16 activations; set train.dtype=bfloat16"
    return None


def config_features(cfg) -> dict:
    """What a config's self-attention layers need of a kernel (for checks before anything is traced)."""
    a = cfg.model.attention
    return dict(causal=cfg.model.arch == "decoder", window=bool(a.sliding_window), softcap=a.logit_softcap,
                prefix=cfg.train.objective == "prefix_lm", dtype=cfg.train.dtype, length=cfg.train.seq_len)


def choose_for_config(cfg, on: str | None = None) -> str:
    return choose(cfg.model.attention.impl, on=on, **config_features(cfg))


def choose(impl: str, on: str | None = None, **features) -> str:
    """The implementation to run: `impl` itself (a ConfigError when it cannot take the mask), or for `auto`
    the kernel of platform `on` (default: the one being compiled for), falling back to XLA."""
    if impl not in IMPLS:
        raise ConfigError(KEY, f"{impl!r} is not one of {', '.join(IMPLS)}")
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.manual_axes:  # a pipeline stage: the kernels' shard_map would nest in its own
        if impl not in ("auto", "xla"):
            raise ConfigError(KEY, f"{impl} is not supported inside pipeline stages yet (mesh.stage > 1); use "
                                   f"auto or xla")
        return "xla"
    if impl != "auto":
        why = unsupported(impl, **features)
        if why:
            raise ConfigError(KEY, f"{impl}: {why}")
        return impl
    dtype = features.get("dtype")
    wanted = {"tpu": "splash",
              "gpu": "cudnn" if dtype is not None and jnp.dtype(dtype) != jnp.float32 else "flash"}
    pick = wanted.get(on or platform(), "xla")
    return pick if unsupported(pick, **features) is None else "xla"


def fused_attention(impl: str, q, k, v, segment_ids, *, causal: bool, window, softcap: float,
                    block_q: int, block_kv: int, local_width: int = 0):
    """q: [B, L, H, D]; k, v: [B, L, KVH, D] (queries already carry any pre-attention scalar); segment_ids:
    [B, L] (0 = padding). `window`: a static int (0 = global), or a traced scalar in a scanned stack whose
    layers alternate between `local_width`-wide local attention (window > 0) and global attention."""
    if impl == "cudnn":
        return _cudnn(q, k, v, segment_ids, causal=causal, window=window)
    length = q.shape[1]
    blocks = (_block(block_q, length, "model.attention.block_q"), _block(block_kv, length, "model.attention.block_kv"))
    interpret = platform() != ("tpu" if impl == "splash" else "gpu")
    if impl == "splash":
        local = functools.partial(_splash, causal=causal, softcap=softcap, blocks=blocks, interpret=interpret)
    else:
        local = functools.partial(_flash, causal=causal, blocks=blocks, interpret=interpret)
    if isinstance(window, jax.Array):  # scanned stack of alternating layers: both masks are static patterns
        body = lambda q, k, v, s, w: jax.lax.cond(w > 0, functools.partial(local, window=local_width),
                                                  functools.partial(local, window=0), q, k, v, s)
        return _per_shard(body, q, k, v, segment_ids, window)
    return _per_shard(functools.partial(local, window=int(window)), q, k, v, segment_ids)


def _block(size: int, length: int, key: str) -> int:
    size = min(size, length)
    if length % size:
        raise ConfigError(key, f"{size} does not divide the sequence length {length}")
    return size


# ------------------------------------------------------------------------------------------ sharding
def _rule(name: str):
    spec = spmd.apply_rules(P(name), None)
    return spec[0] if len(spec) else None


def _axes(entry) -> tuple[str, ...]:
    return tuple(a for a in (entry if isinstance(entry, tuple) else (entry,)) if a)


def _per_shard(fn, q, k, v, segment_ids, *extra):
    """Run the per-device kernel `fn(q, k, v, segment_ids, *extra)` on each device's batch rows and heads."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not spmd.get_logical_axis_rules():
        return fn(q, k, v, segment_ids, *extra)
    sizes = dict(mesh.shape)
    manual = set(mesh.manual_axes)
    keep = lambda entry: tuple(a for a in _axes(entry) if sizes.get(a, 1) > 1 and a not in manual)
    length = keep(_rule("activation_length"))
    if length:
        raise ConfigError(KEY, f"the fused kernels need the whole sequence on each device; it is split over "
                               f"{', '.join(length)} (context parallelism runs its own ring / all-gather "
                               f"attention)")
    batch, heads = keep(_rule("activation_batch")), keep(_rule("activation_heads"))
    while batch and q.shape[0] % math.prod(sizes[a] for a in batch):
        batch = batch[:-1]  # a small batch (scoring one request) is split over fewer axes, the rest repeat it
    while heads and q.shape[2] % math.prod(sizes[a] for a in heads):
        heads = heads[:-1]
    shards = math.prod(sizes[a] for a in heads)
    kv_heads = k.shape[2]
    kv_split = kv_heads % shards == 0
    group = q.shape[2] // kv_heads
    spec = lambda names: (names or None) if len(names) != 1 else names[0]
    q_spec = P(spec(batch), None, spec(heads), None)
    kv_spec = q_spec if kv_split else P(spec(batch), None, None, None)

    def body(q, k, v, s, *extra):
        if not kv_split:  # fewer kv heads than head shards: take the ones this device's query heads read
            index = 0
            for a in heads:
                index = index * sizes[a] + jax.lax.axis_index(a)
            local = q.shape[2]
            first, count = index * local // group, max(local // group, 1)
            k = jax.lax.dynamic_slice_in_dim(k, first, count, axis=2)
            v = jax.lax.dynamic_slice_in_dim(v, first, count, axis=2)
        return fn(q, k, v, s, *extra)

    extra_specs = tuple(P() for _ in extra)
    # Every axis manual: Mosaic (TPU) kernels cannot be partitioned by the compiler, even over size-1 axes.
    return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(spec(batch), None), *extra_specs),
                         out_specs=q_spec, axis_names=set(mesh.axis_names) - manual, check_vma=False)(
        q, k, v, segment_ids, *extra)


# ------------------------------------------------------------------------------------------- kernels
def _splash_kernel(length: int, heads: int, causal: bool, window: int, softcap: float, blocks, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    shape = (length, length)
    if window:  # keys in [q - window + 1, q]; bidirectional windows are refused by `unsupported`
        mask = sa.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    else:
        mask = sa.CausalMask(shape) if causal else sa.FullMask(shape)
    bq, bkv = blocks
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    # Built per trace (its block tables become constants of this program; a cached kernel would leak them).
    return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                              q_seq_shards=1, attn_logits_soft_cap=softcap or None, interpret=interpret)


def _splash(q, k, v, segment_ids, *, causal, window, softcap, blocks, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
    b, length, h, d = q.shape
    kernel = _splash_kernel(length, h, causal, window, float(softcap), blocks, interpret)
    q = q.transpose(0, 2, 1, 3) * jnp.asarray(1.0 / math.sqrt(d), q.dtype)  # the kernel does not scale
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)))(q, k, v, segment_ids)
    return out.transpose(0, 2, 1, 3)


def _flash(q, k, v, segment_ids, *, causal, window, blocks, interpret):
    del window  # refused by `unsupported`
    import warnings
    with warnings.catch_warnings():  # JAX points to tokamax; see the module docstring for why not
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention as triton_attention
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    bq, bkv = blocks
    sizes = triton_attention.BlockSizes(block_q=bq, block_k=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                                        block_q_dq=bq, block_kv_dq=bkv)
    return triton_attention.mha(q, k, v, segment_ids, sm_scale=1.0 / math.sqrt(q.shape[-1]), causal=causal,
                                block_sizes=sizes, interpret=interpret)


def _cudnn(q, k, v, segment_ids, *, causal, window, implementation="cudnn"):
    """(`implementation="xla"` runs the same call on CPU: how the tests check the mask given to cuDNN.)"""
    if isinstance(window, jax.Array):
        raise ConfigError(KEY, "cudnn takes a static sliding window; alternating local/global layers need "
                               "splash or xla")
    same_document = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=same_document, is_causal=causal,
                                        local_window_size=(int(window) - 1, 0) if window else None,
                                        implementation=implementation)
