"""Multi-head attention with MHA/GQA/MQA, RoPE, packed-document masking, sliding windows, soft-capping."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from maxmodel.config.errors import ConfigError
from maxmodel.config.schema import ModelConfig

from . import decode_kernels, remat
from .attention_kernels import choose, fused_attention
from .layers import apply_rope, fused_project, project, rope_frequencies
from .sharding import constrain, param

NEG_INF = -1e30  # finite, so fully-masked (padding) rows give a uniform softmax instead of NaN


def attention_mask(q_segments, kv_segments, q_positions, kv_positions, causal: bool = True,
                   window=0) -> jax.Array:
    """[B, 1, 1, Lq, Lk] boolean: same document, and (causal) not in the future, and within the window.
    Built from positions rather than indices so it holds for any token order (e.g. load-balanced chunks).
    `window` may be a traced scalar (layers scanned with alternating local/global attention); <= 0 = global."""
    mask = q_segments[:, :, None] == kv_segments[:, None, :]
    if causal:
        mask &= q_positions[:, :, None] >= kv_positions[:, None, :]
    if isinstance(window, jax.Array):
        mask &= (window <= 0) | (q_positions[:, :, None] - kv_positions[:, None, :] < window)
    elif window:
        mask &= q_positions[:, :, None] - kv_positions[:, None, :] < window
    return mask[:, None, None]


def prefix_mask(segment_ids, prefix) -> jax.Array:
    """[B, 1, 1, L, L]: both tokens in the same document's prefix (prefix LM: the prefix attends both ways).
    OR-ed with the causal mask, it gives UniLM / T5's prefix-LM mask; `prefix` is [B, L], nonzero on prefixes."""
    inside = (prefix > 0) & (segment_ids > 0)
    both = inside[:, :, None] & inside[:, None, :] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return both[:, None, None]


def dot_product_attention(q, k, v, mask, softcap: float = 0.0) -> jax.Array:
    """q: [B, L, H, D]; k, v: [B, S, KVH, D]; query heads are grouped onto their kv head (GQA).

    The products run head-major ([B, KVH, G, L, D] against [B, KVH, S, D]): transposing q, k and v is cheap,
    while letting the compiler transpose the [.., L, S] scores costs more than the products on CPU. The mask
    enters as an additive bias, whose gradient needs no saved select."""
    b, l, h, d = q.shape
    kvh = k.shape[2]
    q = q.reshape(b, l, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4) * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bkgld,bksd->bkgls", q, k, preferred_element_type=jnp.float32)
    if softcap:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = logits + jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)  # mask: [B, 1, 1, L, S]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgls,bksd->bkgld", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, l, h, d)


def _is_windowed(window) -> bool:
    """Whether any layer this call stands for attends within a sliding window (a traced window may)."""
    return isinstance(window, jax.Array) or bool(window)


class Attention(nnx.Module):
    fused = None  # (names, shapes, metadata) of wq, wk, wv when stored as one `fused_w` (layers.fuse_projections)
    output_major = None  # (name, shape, metadata) of wo when stored [out, in] (layers.fuse_projections)

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype=jnp.float32, window: int = 0,
                 causal: bool = True):
        self.cfg = cfg
        self.window = window
        self.causal = causal  # False: bidirectional within each packed document (encoders)
        d, h, kvh, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std_out = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std=cfg.init_std, dtype=param_dtype)
        self.wk = param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), std=cfg.init_std, dtype=param_dtype)
        self.wv = param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), std=cfg.init_std, dtype=param_dtype)
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), std=std_out, dtype=param_dtype)
        bias = cfg.use_bias or cfg.attention.qkv_bias
        self.q_bias = param(rngs, (h, hd), ("heads", "head_dim"), dtype=param_dtype) if bias else None
        self.k_bias = param(rngs, (kvh, hd), ("kv_heads", "head_dim"), dtype=param_dtype) if bias else None
        self.v_bias = param(rngs, (kvh, hd), ("kv_heads", "head_dim"), dtype=param_dtype) if bias else None
        self.o_bias = param(rngs, (d,), ("embed",), dtype=param_dtype) if cfg.use_bias else None
        self.use_rope = cfg.positional == "rope"

    def _project(self, x, w, b):
        y = project(self, w, x)  # plus a fine-tuning adapter's update, when one is attached to w
        return y + b[...].astype(x.dtype) if b is not None else y

    def __call__(self, x, segment_ids, positions, window=None, prefix=None):
        """window: this layer's sliding window when it varies by layer (a traced scalar; <= 0 = global).
        prefix: [B, L], nonzero on each document's prefix, which attends to itself both ways (prefix LM)."""
        window = self.window if window is None else window
        q, k, v = self._qkv(x, positions)
        softcap = self.cfg.attention.logit_softcap
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty and mesh.shape.get("sequence", 1) > 1:
            if prefix is not None:  # the ring/all-gather kernels build their masks from positions alone
                raise ConfigError("mesh.sequence", "train.objective=prefix_lm is not supported with context "
                                                   "parallelism (mesh.sequence > 1)")
            # Context parallelism: the sequence is split over `sequence`; K/V travel (ring) or are gathered.
            from maxmodel.parallel.ring_attention import allgather_attention, ring_attention
            attend = ring_attention if self.cfg.attention.context_parallel == "ring" else allgather_attention
            out = attend(q, k, v, segment_ids, segment_ids, positions, positions, causal=self.causal,
                         sliding_window=window, logit_softcap=softcap)
        else:
            a = self.cfg.attention
            impl = choose(a.impl, causal=self.causal, window=_is_windowed(window), softcap=softcap,
                          prefix=prefix is not None, dtype=q.dtype, length=q.shape[1])
            if impl == "xla":
                mask = attention_mask(segment_ids, segment_ids, positions, positions, self.causal, window)
                if prefix is not None:
                    mask |= prefix_mask(segment_ids, prefix)
                out = dot_product_attention(q, k, v, mask, softcap)
            else:  # a fused kernel; it masks by index, which packed rows' positions follow within a document
                out = fused_attention(impl, q, k, v, segment_ids, causal=self.causal, window=window,
                                      softcap=softcap, block_q=a.block_q, block_kv=a.block_kv,
                                      local_width=a.sliding_window)
        out = constrain(out, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        return self._output(out, x.dtype)

    def _qkv(self, x, positions):
        """Projected queries [B, L, H, D] and keys, values [B, L, KVH, D], rotated by RoPE; the queries carry
        any query_pre_attn_scalar (every attention path scales by head_dim ** -0.5)."""
        if self.fused is not None:  # the engine's CPU decode layout: one product for the three
            q, k, v = fused_project(self, x)
            q, k, v = (y + b[...].astype(x.dtype) if b is not None else y
                       for y, b in zip((q, k, v), (self.q_bias, self.k_bias, self.v_bias)))
        else:
            q = remat.name(self._project(x, self.wq, self.q_bias), "query_proj")
            k = remat.name(self._project(x, self.wk, self.k_bias), "key_proj")
            v = remat.name(self._project(x, self.wv, self.v_bias), "value_proj")
        if self.use_rope:
            inv_freq = rope_frequencies(self.cfg)  # numpy: a compile-time constant, not model state
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        k = constrain(k, ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim"))
        v = constrain(v, ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim"))
        scale_dim = self.cfg.attention.query_pre_attn_scalar
        if scale_dim:
            q = q * jnp.asarray(math.sqrt(self.cfg.head_dim / scale_dim), q.dtype)
        return q, k, v

    def decode(self, x, positions, lengths, cache, window=None):
        """x: [B, T, d_model] new tokens at `positions` [B, T] (-1 = padding) after the `lengths` [B] tokens
        in `cache` (kv_cache.py). Returns (output [B, T, d_model], the cache with the new tokens written)."""
        window = self.window if window is None else window  # static here: a sliding-window layer's cache is a ring
        q, k, v = self._qkv(x, positions)
        out, cache = decode_kernels.attend(self.cfg.attention.impl, q, k, v, positions, lengths, cache, window,
                                           int(window) > 0, self.cfg.attention.logit_softcap)
        return self._output(out, x.dtype), cache

    def _output(self, out, dtype):
        """The heads [B, L, H, D] projected back to d_model."""
        y = project(self, self.wo, out, contract=2, dtype=dtype)
        return remat.name(y + self.o_bias[...].astype(dtype) if self.o_bias is not None else y, remat.OUT)
