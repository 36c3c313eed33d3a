"""Weight-only quantization for inference: int8 per output channel, int4 group-wise.

`quantize_params(cfg, params, mode)` returns the model's nnx.State with the value of every linear weight
replaced by a `QuantizedWeight` (a registered pytree: integer codes + float scales). Reading it the way the
model does, `w[...]`, gives back the dequantized float array, so the model code, `nnx.merge` and a jitted
step run unchanged on either tree: dequantization happens inside the compiled program, next to the matmul
that uses it (in a scanned stack, one layer at a time).

Which weights: those whose logical axes (the trailing ones; a scanned stack adds a leading `layers`) are
in LINEAR, i.e. attention wq/wk/wv/wo (self and cross), MLP wi/wg/wo (shared experts included), MoE
expert_wi/wg/wo, the untied head, the encoder's MLM dense and pooler, and the embedding table when it is
tied (then it is the head too). The
untied embedding table (a lookup, not a matmul), the MoE router (E columns, decides the routing), norms and
biases stay float.

Layout: a weight is [*lead, *in, *out] where `in` are the contraction axes (one or two: the attention output
projection contracts heads × head_dim), `lead` are axes that keep their own scales (`layers`, `exp`, and
the vocab rows of a tied table, whose `in` is the last axis). The scale tensor is [*lead, G, *out]: G = 1
for int8 (one scale per output channel), G = K / group_size for int4 (K = the flattened contraction
length, groups of consecutive rows). Symmetric, no zero point: q = round(w / s), s = max|w| / 127 (int8)
or / 7 (int4, codes in [-7, 7]). int4 codes are stored as jnp.int4, which XLA packs two to a byte.

Sharding: q has the float weight's sharding (same shape); the scale keeps the sharding of the lead and out
axes and is replicated along G.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from maxmodel.config.errors import ConfigError
from maxmodel.models.quant import symmetric_quantize

MODES = {"int8": (jnp.int8, 127.0), "int4": (jnp.int4, 7.0)}
# Logical axes of the linear weights (without `layers`) -> (number of contraction axes, axes after them).
LINEAR = {
    ("embed", "heads", "head_dim"): (1, 2),      # wq
    ("embed", "kv_heads", "head_dim"): (1, 2),   # wk, wv
    ("heads", "head_dim", "embed"): (2, 1),      # attention wo
    ("embed", "mlp"): (1, 1),                    # MLP wi, wg
    ("mlp", "embed"): (1, 1),                    # MLP wo
    ("exp", "embed", "exp_mlp"): (1, 1),         # expert_wi, expert_wg
    ("exp", "exp_mlp", "embed"): (1, 1),         # expert_wo
    ("embed", "vocab"): (1, 1),                  # untied head
    ("embed", None): (1, 1),                     # encoder MLM dense and pooler (the MoE router: FLOAT_NAMES)
}
FLOAT_NAMES = {"router"}                         # linear, but kept float: E columns that decide the routing
TIED_TABLE = ("vocab", "embed")                  # tied: contraction over embed, one scale per vocab row


@struct.dataclass
class QuantizedWeight:
    """A weight stored as integer codes `q` (the weight's shape) and float `scale` [*lead, G, *out].
    `n_in` contraction axes followed by `n_after` axes end the shape; the axes before them are lead axes
    (a scan may slice them off: nothing here depends on how many there are)."""
    q: jax.Array
    scale: jax.Array
    n_in: int = struct.field(pytree_node=False)
    n_after: int = struct.field(pytree_node=False)
    dtype: np.dtype = struct.field(pytree_node=False)  # the float dtype it dequantizes to

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return self.q.ndim

    @property
    def size(self) -> int:
        return self.q.size

    def dequantize(self) -> jax.Array:
        shape, i1 = self.q.shape, self.q.ndim - self.n_after
        i0 = i1 - self.n_in
        lead, k, after = shape[:i0], math.prod(shape[i0:i1]), shape[i1:]
        groups = self.scale.shape[i0]
        codes = self.q.astype(self.dtype)
        if groups == 1:  # per output channel: broadcast over the contraction axes, no reshape
            return codes * self.scale.reshape(*lead, *([1] * self.n_in), *after).astype(self.dtype)
        w = codes.reshape(*lead, groups, k // groups, *after) * jnp.expand_dims(self.scale, i0 + 1).astype(self.dtype)
        return w.reshape(shape)

    def __getitem__(self, index):
        """`variable[...]` (nnx.Variable.get_value(index=...)) lands here: the dequantized weight, indexed."""
        w = self.dequantize()
        return w if index is Ellipsis else w[index]

    def astype(self, dtype) -> jax.Array:
        return self.dequantize().astype(dtype)

    def __jax_array__(self):
        return self.dequantize()


def _check(mode: str, group_size: int):
    if mode not in MODES:
        raise ConfigError("quantize.mode", f"unknown weight quantization {mode!r}; choose one of {sorted(MODES)}")
    if mode == "int4" and (not isinstance(group_size, int) or group_size <= 0):
        raise ConfigError("quantize.group_size", f"must be a positive integer, got {group_size!r}")


def _layout(path: tuple, axes: tuple, tied: bool) -> tuple[int, int] | None:
    """(n_in, n_after) when the parameter at `path` with these logical axes is a linear weight, else None."""
    axes = tuple(axes)
    if path and path[-1] in FLOAT_NAMES:
        return None
    for names, layout in LINEAR.items():
        if axes[len(axes) - len(names):] == names and all(a == "layers" for a in axes[:len(axes) - len(names)]):
            return layout
    if tied and axes[-2:] == TIED_TABLE and all(a == "layers" for a in axes[:-2]):
        return (1, 0)
    return None


def _scale_sharding(sharding, i0: int, i1: int):
    if isinstance(sharding, NamedSharding):
        spec = list(sharding.spec) + [None] * (i1 - len(sharding.spec))
        return NamedSharding(sharding.mesh, PartitionSpec(*spec[:i0], None, *spec[i1:]))
    return sharding


@functools.cache
def _kernel(n_in: int, n_after: int, mode: str, groups: int, out_shardings):
    """The jitted quantizer for one layout (jit then caches one program per weight shape)."""
    code_dtype, qmax = MODES[mode]

    def run(w):
        i1 = w.ndim - n_after
        i0 = i1 - n_in
        k = math.prod(w.shape[i0:i1])
        g = w.reshape(*w.shape[:i0], groups, k // groups, *w.shape[i1:])
        q, scale = symmetric_quantize(g, (i0 + 1,), qmax)
        return q.reshape(w.shape).astype(code_dtype), jnp.squeeze(scale, i0 + 1)  # scale: [*lead, G, *after]
    return jax.jit(run, out_shardings=out_shardings)


def quantize_array(w: jax.Array, n_in: int, n_after: int, mode: str, group_size: int = 128,
                   name: str = "") -> QuantizedWeight:
    """One weight [*lead, *in, *out] -> QuantizedWeight; q keeps w's sharding, the scale its lead/out axes'."""
    _check(mode, group_size)
    i1 = w.ndim - n_after
    i0 = i1 - n_in
    k = math.prod(w.shape[i0:i1])
    groups = 1
    if mode == "int4":
        if k % group_size:
            raise ConfigError("quantize.group_size", f"group_size={group_size} does not divide the contraction "
                                                     f"length {k} of {name or 'a weight'} {tuple(w.shape)}")
        groups = k // group_size
    sharding = getattr(w, "sharding", None)
    out = None if sharding is None else (sharding, _scale_sharding(sharding, i0, i1))
    q, scale = _kernel(n_in, n_after, mode, groups, out)(w)
    return QuantizedWeight(q, scale, n_in, n_after, np.dtype(w.dtype))


def quantize_params(cfg, params: nnx.State, mode: str, group_size: int = 128) -> nnx.State:
    """The state with every linear weight's value a QuantizedWeight (see the module docstring); other
    variables are the same objects' values. `cfg` is the maxmodel Config (for tie_embeddings)."""
    _check(mode, group_size)
    tied = bool(cfg.model.tie_embeddings)
    flat = []
    for path, var in nnx.to_flat_state(params):
        axes = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Param) else None
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        layout = _layout(path, axes, tied) if axes and isinstance(value, jax.Array) else None
        if layout is not None:
            name = ".".join(str(p) for p in path)
            var = var.replace(quantize_array(value, *layout, mode, group_size, name))
        flat.append((path, var))
    return nnx.from_flat_state(flat)


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


def _bits(dtype) -> int:
    dtype = jnp.dtype(dtype)
    return 4 if dtype in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else dtype.itemsize * 8


def weight_bytes(params, cfg=None) -> int:
    """Bytes the tree's arrays occupy, one copy each (int4 codes at half a byte, as XLA stores them); any
    pytree (a KV cache too). With `cfg` and an nnx.State, only the linear weights: those quantize_params
    quantizes (quantized or still float)."""
    if cfg is None:
        return sum(x.size * _bits(x.dtype) // 8 for x in jax.tree.leaves(params))
    tied, total = bool(cfg.model.tie_embeddings), 0
    for path, var in nnx.to_flat_state(params):
        value = var.get_value()
        axes = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Param) else None
        if is_quantized(value) or (axes and _layout(path, axes, tied) is not None):
            total += weight_bytes(value)
    return total
