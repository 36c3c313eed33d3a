"""QLoRA (Dettmers et al. 2023): the frozen base's projection weights (q k v o gate up down, whichever are LoRA
targets or not) stored quantized and dequantized on the fly where layers.project() reads them (`w[...]`), with
LoRA adapters (lora.py) on top in the compute dtype; embeddings, norms and the head stay as they are.

- nf4: 4-bit NormalFloat codes, two per byte, with one float32 absmax scale per `peft.block_size` consecutive
  weights along one dimension of the weight (the largest that block_size divides): ~8x smaller than float32.
  The NF4 levels are the QLoRA paper's (bitsandbytes' table): quantiles of N(0, 1) scaled to [-1, 1] with an
  exact zero. Rounding to the nearest level bounds the error per weight by half the widest gap between levels
  (0.1385) times its block's absmax.
- int8: symmetric per output channel (absmax over the input dims maps to 127): ~4x smaller; error per weight
  at most its channel's absmax / 254.

Codes keep the weight's logical axes (so they shard like it and go through nnx.scan / the pipeline with
their `layers` axis); the NF4 scales drop the axis of their block dimension (they are 1/16 of the codes).
Written natively, not with qwix, for the reason peft/lora.py gives; benchmarks/RESULTS.md.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxmodel.config.errors import ConfigError
from maxmodel.models.quant import symmetric_quantize

from .targets import axes_of, targets_of

NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
NF4_MAX_ERROR = float(np.max(np.diff(NF4)) / 2)  # per weight, in units of its block's absmax


def nf4_quantize(w, block: int, axis: int):
    """(codes uint8 with `axis` halved, scales float32 with `axis` of size n / block)."""
    wt = jnp.moveaxis(w.astype(jnp.float32), axis, -1)
    n = wt.shape[-1]
    blocks = wt.reshape(*wt.shape[:-1], n // block, block)
    absmax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    scale = jnp.where(absmax > 0, absmax, 1.0)
    mids = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
    idx = jnp.searchsorted(mids, (blocks / scale).reshape(*wt.shape[:-1], n // 2, 2)).astype(jnp.uint8)
    codes = idx[..., 0] | (idx[..., 1] << 4)
    return jnp.moveaxis(codes, -1, axis), jnp.moveaxis(scale[..., 0], -1, axis)


def nf4_dequantize(codes, scales, axis: int, dtype=jnp.float32):
    c = jnp.moveaxis(codes, axis, -1)
    idx = jnp.stack([c & 15, c >> 4], axis=-1).reshape(*c.shape[:-1], 2 * c.shape[-1])
    s = jnp.moveaxis(scales, axis, -1)
    vals = jnp.take(jnp.asarray(NF4), idx.astype(jnp.int32), axis=0).reshape(*s.shape, -1) * s[..., None]
    return jnp.moveaxis(vals.reshape(*c.shape[:-1], -1), -1, axis).astype(dtype)


def int8_quantize(w, contract: int, lead: int = 0):
    codes, scale = symmetric_quantize(w, tuple(range(lead, lead + contract)), 127)
    return codes.astype(jnp.int8), scale


class QuantizedWeight(nnx.Module):
    """A frozen weight as codes + scales; `[...]` gives it back dequantized (what project() reads)."""

    def __init__(self, kind: str, codes, scales, axis: int, dtype):
        self.kind, self.axis, self.dtype = kind, axis, dtype  # axis counts from the end: stacked or not
        self.codes, self.scales = nnx.Param(codes), nnx.Param(scales)

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError("a quantized weight is read whole: w[...]")
        if self.kind == "nf4":
            return nf4_dequantize(self.codes[...], self.scales[...], self.axis, self.dtype)
        return (self.codes[...].astype(jnp.float32) * self.scales[...]).astype(self.dtype)

    @property
    def shape(self):
        return self[...].shape


def _block_axis(shape, block: int, name: str) -> int:
    fits = [i for i, n in enumerate(shape) if n % block == 0 and block % 2 == 0]
    if not fits:
        raise ConfigError("peft.block_size", f"{block} divides no dimension of {name} {tuple(shape)} (and must "
                                             f"be even): choose a divisor of one")
    return max(fits, key=lambda i: shape[i])


def _partitioned(value, axes):
    return nnx.with_partitioning(lambda: value, tuple(axes))()


def quantize_base(model, cfg):
    from .config import TARGETS
    p = cfg.peft
    for module, attr, contract, lead in targets_of(model, tuple(TARGETS)):
        w = getattr(module, attr)
        value, axes = w[...], list(axes_of(w))
        shape = value.shape[lead:]
        if p.quant == "nf4":
            axis = lead + _block_axis(shape, p.block_size, f"{type(module).__name__}.{attr}")
            codes, scales = nf4_quantize(value, p.block_size, axis)
            scale_axes = [None if i == axis else a for i, a in enumerate(axes)]
            q = QuantizedWeight("nf4", _partitioned(codes, axes), _partitioned(scales, scale_axes),
                                axis - value.ndim, value.dtype)
        else:
            codes, scales = int8_quantize(value, contract, lead)
            scale_axes = [None if lead <= i < lead + contract else a for i, a in enumerate(axes)]
            q = QuantizedWeight("int8", _partitioned(codes, axes), _partitioned(scales, scale_axes), 0,
                                value.dtype)
        setattr(module, attr, q)
    return model




def dequantize_base(model):
    """Every quantized weight replaced, in place, by its float dequantization (for merging and export)."""
    for _, module in list(nnx.iter_modules(model)):
        for name, value in list(vars(module).items()):
            if isinstance(value, QuantizedWeight):
                setattr(module, name, nnx.Param(value[...]))
    return model
