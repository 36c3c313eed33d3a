"""Building blocks: norms, embeddings, positional encodings, MLPs."""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxmodel.config.schema import ModelConfig

from . import remat
from .quant import fake_quantize
from .sharding import constant_param, constrain, param


def dense(x: jax.Array, w: jax.Array, contract: int = 1, preferred_element_type=None) -> jax.Array:
    """x [..., *in] times w [*in, *out], contracting the last `contract` dims of x with the first of w, as one
    2-D matmul [rows, in] x [in, out]. Same math as the einsum; written 2-D because XLA:CPU lays out the
    backward pass of a batched 3-D product with transposing copies of the activation gradient ([B, L, d_ff]
    written column-wise), which cost more than the matmuls themselves (benchmarks/RESULTS.md).

    With bf16 / f16 activations on CPU (mixed precision) the product runs through `lowp_matmul`: w is cast to
    x's dtype inside it, and its gradient comes out in w's own dtype from a float32-accumulated product."""
    lead, k = x.shape[:x.ndim - contract], math.prod(x.shape[x.ndim - contract:])
    out = w.shape[contract:]
    x2, w2 = x.reshape(-1, k), w.reshape(k, -1)
    if preferred_element_type is None and cpu_low_precision(x) and jnp.issubdtype(w.dtype, jnp.floating):
        y = lowp_matmul(x2, w2)
    else:
        y = jnp.dot(x2, w2, preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *out)


def dense_rows(x: jax.Array, table: jax.Array) -> jax.Array:
    """x [..., d] against the rows of table [n, d]: [..., n] (logits of a tied embedding table or of a
    vocab-major head). One contraction of both last dims: written as `dense(x, table.T)`, XLA:CPU copies the
    transpose out first when x has one row (a 7.4 ms decode step of bench-50m became 18 ms). Mixed
    precision on CPU keeps `dense`'s lowp_matmul (its float32 table gradient)."""
    if cpu_low_precision(x):
        return dense(x, table.T)
    x2 = x.reshape(-1, table.shape[1])
    if x2.shape[0] <= SMALL_ROWS and jax.default_backend() == "cpu":
        # Few rows (decode, speculative verification): XLA:CPU runs table @ x.T -> [n, rows] ~2x faster than
        # x @ table.T at 5-64 rows (as fast at 1). The barrier keeps XLA from folding the transpose back into
        # the product, which would restore the slow form.
        out = jax.lax.optimization_barrier(jax.lax.dot_general(table, x2, (((1,), (1,)), ((), ())))).T
    else:
        out = jax.lax.dot_general(x2, table, (((1,), (1,)), ((), ())))
    return out.reshape(*x.shape[:-1], table.shape[0])


SMALL_ROWS = 128  # at 256 rows and more both forms of dense_rows cost the same


def cpu_low_precision(*xs) -> bool:
    """Whether these arrays are bf16 / f16 and the computation runs on XLA:CPU (see matmul_tn)."""
    return jax.default_backend() == "cpu" and all(x.dtype in (jnp.bfloat16, jnp.float16) for x in xs)


def _rows_major_transpose(a: jax.Array) -> jax.Array:
    """a.T of a 2-D array, written out row-major. XLA would otherwise keep a's bytes and read them column-wise
    (a transpose as a layout change), and XLA:CPU runs a bf16 product with a column-major left operand as a
    float32 one on converted copies of both operands: half the speed, plus the converts. The split reshape
    behind an optimisation barrier is not a bitcast of a column-major array, so the transpose is a real copy."""
    t = a.T
    m, k = t.shape
    split = next((s for s in (64, 32, 16, 8, 4, 2) if k % s == 0 and k > s), 0)
    if not split:
        return t
    return jax.lax.optimization_barrier(t.reshape(m, split, k // split)).reshape(m, k)


def matmul_tn(a: jax.Array, b: jax.Array, out_dtype=jnp.float32) -> jax.Array:
    """a.T @ b [m, n] for a [k, m], b [k, n], contracting the rows of both (weight gradients), accumulated and
    returned in out_dtype. bf16 / f16 operands on CPU: a is transposed row-major first (see
    _rows_major_transpose), so the product stays a bf16 one with float32 accumulation."""
    if not cpu_low_precision(a, b):
        return jnp.dot(a.T, b, preferred_element_type=out_dtype)
    return jnp.dot(_rows_major_transpose(a), b, preferred_element_type=out_dtype)


@jax.custom_vjp
def lowp_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [r, k] @ w [k, n] in x's (bf16 / f16) dtype, w cast to it; the gradient of w in w's dtype from a
    float32-accumulated matmul_tn (float32 master weights get unrounded gradients), that of x as autodiff's."""
    return jnp.dot(x, w.astype(x.dtype))


def _lowp_matmul_fwd(x, w):
    wc = w.astype(x.dtype)
    return jnp.dot(x, wc), (x, wc, jnp.zeros((), w.dtype))  # the scalar only carries w's dtype


def _lowp_matmul_bwd(residuals, g):
    x, wc, w_dtype = residuals
    dx = jax.lax.dot_general(g, wc, (((1,), (1,)), ((), ())))  # g @ wc.T: a transposed right operand is fine
    return dx.astype(x.dtype), matmul_tn(x, g.astype(x.dtype)).astype(w_dtype.dtype)


lowp_matmul.defvjp(_lowp_matmul_fwd, _lowp_matmul_bwd)


ADAPTER_SUFFIX = "_lora"


def project(module: nnx.Module, w: nnx.Variable, x: jax.Array, contract: int = 1, dtype=None) -> jax.Array:
    """dense(x, w) for weight variable `w` of `module`, plus the update of an adapter attached to that weight
    (maxmodel/finetune/peft attaches LoRA adapters as attribute `<weight name>_lora`; none in pretraining).
    The weight is cast to `dtype` (default: x's). `w` may be a QLoRA-quantized weight (peft/qlora.py), whose
    `[...]` dequantizes; with train.qat the module carries `qat_bits` and the weight is fake-quantized
    (finetune/qat.py)."""
    attrs = vars(module)
    wv = w[...]
    output_major = getattr(module, "output_major", None)
    if output_major is not None and w is attrs.get(output_major[0]):
        _, shape, _ = output_major  # stored [out, in] by fuse_projections
        lead = x.shape[:x.ndim - contract]
        return dense_rows(x.reshape(*lead, -1), wv.astype(dtype or x.dtype)).reshape(*lead, *shape[contract:])
    bits = attrs.get("qat_bits")
    if bits:
        wv = fake_quantize(wv, bits, contract)
    if (dtype or x.dtype) == x.dtype and cpu_low_precision(x):
        y = dense(x, wv, contract)  # cast inside, float32 weight gradients (lowp_matmul)
    else:
        y = dense(x, wv.astype(dtype or x.dtype), contract)
    for name, value in attrs.items():
        if value is w:
            adapter = attrs.get(name + ADAPTER_SUFFIX)
            return y if adapter is None else y + adapter(x)
    return y


# Projections of one input, by exact class name (CrossAttention, encoder_decoder.py, subclasses Attention but
# projects its keys and values from the encoder output, so it is not fused): the weights, and how many
# trailing dims each product yields ((heads, head_dim) or (mlp,)).
FUSABLE = {"Attention": (("wq", "wk", "wv"), 2), "MLP": (("wi", "wg"), 1)}
OUTPUT_PROJECTION = {"Attention": ("wo", 2), "MLP": ("wo", 1)}  # name, contracted dims


def fuse_projections(module) -> bool:
    """Store the projections of one input that `module` makes (FUSABLE: q/k/v, or the gated MLP's up and
    gate) as one weight `fused_w` [*lead, in, sum of outs], so that they run as one product: the inference
    engine's XLA:CPU decode layout (engine.decode_layout), where a [B, 512] x [512, 1536] product costs less
    than three [B, 512] x [512, 512] ones. The joined weight, and the output projection `wo` with it, are
    stored output-major ([out, in]) and multiplied as dense_rows does: ~2x faster than [in, out] at 5-64 rows.
    Only plain float weights on one device, without adapters or QAT (their hooks need the separate
    weights). Returns whether it fused; `unfuse_projections` undoes it."""
    names, outs = FUSABLE.get(type(module).__name__, ((), 0))
    attrs = vars(module)
    if not names or any(attrs.get(n) is None for n in names) or attrs.get("qat_bits") or any(
            attrs.get(n + ADAPTER_SUFFIX) is not None for n in names):
        return False
    values = [attrs[n].get_value() for n in names]
    if not all(isinstance(v, jax.Array) and jnp.issubdtype(v.dtype, jnp.floating)
               and len(v.sharding.device_set) == 1 for v in values):
        return False
    lead = values[0].shape[:values[0].ndim - outs - 1]
    fused = jnp.concatenate([v.reshape(*lead, v.shape[len(lead)], -1) for v in values], axis=-1)
    metas = tuple(tuple(sorted(attrs[n].get_metadata().items())) for n in names)  # restored by unfuse
    module.fused = (names, tuple(v.shape for v in values), metas)
    meta = dict(metas[0])
    if meta.get("out_sharding"):
        meta["out_sharding"] = tuple(meta["out_sharding"][:len(lead)]) + (None, meta["out_sharding"][len(lead)])
    module.fused_w = _param_as_placed(jnp.swapaxes(fused, -1, -2), meta)
    for n in names:
        delattr(module, n)
    out_name, contract = OUTPUT_PROJECTION[type(module).__name__]
    w = attrs.get(out_name)
    if (w is not None and attrs.get(out_name + ADAPTER_SUFFIX) is None and isinstance(w.get_value(), jax.Array)
            and jnp.issubdtype(w.get_value().dtype, jnp.floating) and len(w.get_value().sharding.device_set) == 1):
        value = w.get_value()
        lead = value.shape[:len(lead)]
        meta = tuple(sorted(w.get_metadata().items()))
        module.output_major = (out_name, value.shape[len(lead):], meta)
        rows = jnp.swapaxes(value.reshape(*lead, math.prod(value.shape[len(lead):len(lead) + contract]), -1), -1, -2)
        setattr(module, out_name, _param_as_placed(rows, {**dict(meta), "out_sharding": None}))
    return True


def _param_as_placed(value, meta: dict) -> nnx.Param:
    """A Param of an array already placed, with this metadata (its logical names are not re-applied)."""
    var = nnx.Param(value, **{**meta, "eager_sharding": False})
    var.set_metadata("eager_sharding", meta.get("eager_sharding", False))
    return var


def unfuse_projections(module) -> None:
    names, shapes, metas = module.fused
    fused = jnp.swapaxes(module.fused_w.get_value(), -1, -2)
    widths = [math.prod(s[fused.ndim - 1:]) for s in shapes]
    cuts = list(itertools.accumulate(widths))[:-1]
    for n, shape, meta, part in zip(names, shapes, metas, jnp.split(fused, cuts, axis=-1)):
        setattr(module, n, _param_as_placed(part.reshape(shape), dict(meta)))
    del module.fused_w
    module.fused = None
    if module.output_major is not None:
        out_name, shape, meta = module.output_major
        rows = getattr(module, out_name).get_value()
        value = jnp.swapaxes(rows, -1, -2).reshape(*rows.shape[:rows.ndim - 2], *shape)
        setattr(module, out_name, _param_as_placed(value, dict(meta)))
        module.output_major = None


def fused_project(module, x):
    """x's products with the weights fuse_projections joined, in their own shapes."""
    _, shapes, _ = module.fused
    outs = FUSABLE[type(module).__name__][1]
    w = module.fused_w[...]  # stored [out, in]
    y = dense_rows(x, w.astype(x.dtype))
    dims = [s[len(s) - outs:] for s in shapes]
    cuts = list(itertools.accumulate(math.prod(o) for o in dims))[:-1]
    return [part.reshape(*x.shape[:-1], *o) for part, o in zip(jnp.split(y, cuts, axis=-1), dims)]


def with_adapter(module, attr: str, dtype):
    """The weight `attr` of `module` in `dtype`, plus its adapter's update folded in (W + s A B) when it has
    one: for weights not multiplied by project(), like a MoE layer's experts, whose dispatch paths (capacity
    einsums, ragged groups, expert-parallel shard_map) then need no change. It costs one weight-sized
    temporary per layer, which x A B would not."""
    w = getattr(module, attr)[...]
    adapter = vars(module).get(attr + ADAPTER_SUFFIX)
    return (w if adapter is None else w + adapter.delta().astype(w.dtype)).astype(dtype)


def adapt(module: nnx.Module, site: str, y: jax.Array) -> jax.Array:
    """y through the bottleneck adapter attached to `module` at `site` (peft.method=adapter), else y."""
    adapter = vars(module).get(site + "_adapter")
    return y if adapter is None else adapter(y)


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale; with plus_one (Gemma) the stored scale starts at 0 and y uses (1 + scale)."""

    def __init__(self, dim: int, eps: float, param_dtype=jnp.float32, plus_one: bool = False):
        self.eps = eps
        self.plus_one = plus_one
        self.scale = constant_param((dim,), ("norm",), 0.0 if plus_one else 1.0, param_dtype)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        return (y * (1.0 + scale if self.plus_one else scale)).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, use_bias: bool = True, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = constant_param((dim,), ("norm",), 1.0, param_dtype)
        self.bias = constant_param((dim,), ("norm",), 0.0, param_dtype) if use_bias else None

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def make_norm(cfg: ModelConfig, param_dtype) -> nnx.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype, plus_one=cfg.norm_plus_one)
    return LayerNorm(cfg.d_model, cfg.norm_eps, use_bias=True, param_dtype=param_dtype)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies of RoPE, with LLaMA 3's piecewise scaling when rope_scaling.factor > 1."""
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    s = cfg.rope_scaling
    if s.factor <= 1.0:
        return inv.astype(np.float32)
    wavelen = 2 * math.pi / inv
    low_wavelen = s.original_max_len / s.low_freq_factor
    high_wavelen = s.original_max_len / s.high_freq_factor
    smooth = (s.original_max_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    scaled = np.where(mid, (1 - smooth) * inv / s.factor + smooth * inv, scaled)
    return scaled.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate pairs (first half, second half) of the head dim; x: [B, L, H, D], positions: [B, L]."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)      # [B, L, D/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def sinusoidal_table(length: int, dim: int) -> np.ndarray:
    """The original Transformer's fixed position table (Vaswani et al. 2017, section 3.5)."""
    pos = np.arange(length)[:, None]
    inv = 1.0 / (10000 ** (np.arange(0, dim, 2) / dim))
    table = np.zeros((length, dim), np.float32)
    table[:, 0::2], table[:, 1::2] = np.sin(pos * inv), np.cos(pos * inv)
    return table


class Embed(nnx.Module):
    """Token embedding plus learned/sinusoidal positions; also the tied output projection."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        self.table = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), std=cfg.init_std,
                           dtype=param_dtype)
        if cfg.positional == "learned":
            self.pos_table = param(rngs, (cfg.max_seq_len, cfg.d_model), (None, "embed"), std=cfg.init_std,
                                   dtype=param_dtype)

    def __call__(self, tokens, positions, dtype):
        x = jnp.take(self.table[...], tokens, axis=0).astype(dtype)
        if self.cfg.embed_scale:
            x = x * jnp.asarray(math.sqrt(self.cfg.d_model), dtype)
        if self.cfg.positional == "learned":
            x = x + jnp.take(self.pos_table[...], positions, axis=0).astype(dtype)
        elif self.cfg.positional == "sinusoidal":
            x = x + jnp.take(jnp.asarray(sinusoidal_table(self.cfg.max_seq_len, self.cfg.d_model)), positions,
                             axis=0).astype(dtype)
        return constrain(x, ("activation_batch", "activation_length", "activation_embed"))

    def attend(self, x):
        """Logits against the embedding table (tied embeddings)."""
        return dense_rows(x, self.table[...].astype(x.dtype))


# "gelu" is the tanh approximation (GPT-2); "gelu_exact" the erf form (BERT).
_ACTIVATIONS = {"swiglu": jax.nn.silu, "geglu": lambda x: jax.nn.gelu(x, approximate=True),
                "gelu": lambda x: jax.nn.gelu(x, approximate=True),
                "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False), "relu": jax.nn.relu}


class MLP(nnx.Module):
    """Gated (SwiGLU/GeGLU: act(x W_gate) * x W_up) or plain (GELU/ReLU) feed-forward block."""
    fused = None  # (names, shapes, metadata) of wi, wg when stored as one `fused_w` (fuse_projections)
    output_major = None  # (name, shape, metadata) of wo when stored [out, in] (fuse_projections)

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.gated = cfg.activation in ("swiglu", "geglu")
        self.act = _ACTIVATIONS[cfg.activation]
        std_out = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.wi = param(rngs, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), std=cfg.init_std, dtype=param_dtype)
        if self.gated:
            self.wg = param(rngs, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), std=cfg.init_std, dtype=param_dtype)
        self.wo = param(rngs, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), std=std_out, dtype=param_dtype)
        self.in_bias = param(rngs, (cfg.d_ff,), ("mlp",), dtype=param_dtype) if cfg.use_bias else None
        self.gate_bias = param(rngs, (cfg.d_ff,), ("mlp",), dtype=param_dtype) if cfg.use_bias and self.gated else None
        self.out_bias = param(rngs, (cfg.d_model,), ("embed",), dtype=param_dtype) if cfg.use_bias else None

    def __call__(self, x):
        h, g = fused_project(self, x) if self.fused is not None else (project(self, self.wi, x), None)
        if self.in_bias is not None:
            h = h + self.in_bias[...].astype(x.dtype)
        if self.gated:
            g = project(self, self.wg, x) if g is None else g
            if self.gate_bias is not None:
                g = g + self.gate_bias[...].astype(x.dtype)
            h = self.act(g) * h
        else:
            h = self.act(h)
        h = remat.name(constrain(h, ("activation_batch", "activation_length", "activation_mlp")), "mlp_in")
        out = project(self, self.wo, h)
        if self.out_bias is not None:
            out = out + self.out_bias[...].astype(x.dtype)
        return remat.name(out, "mlp_out")
