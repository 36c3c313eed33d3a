"""Symmetric integer quantization, the one rule behind inference weights (inference/quantize.py), QLoRA's
int8 base (finetune/peft/qlora.py) and quantization-aware training (finetune/qat.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def symmetric_quantize(w, axes: tuple[int, ...], qmax: float):
    """(codes, scale): codes are w / scale rounded into [-qmax, qmax] (float32, still to be cast), scale
    (float32, keepdims over `axes`) maps each slice's absmax to qmax; an all-zero slice gets scale 1."""
    w32 = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w32), axis=axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / qmax, 1.0)
    return jnp.clip(jnp.round(w32 / scale), -qmax, qmax), scale


def quantize_dequantize(w, bits: int, contract: int = 1):
    """Symmetric per-output-channel round trip of a weight [*in (contract dims), *out]: the absmax over the
    input dims maps to 2^(bits-1) - 1."""
    codes, scale = symmetric_quantize(w, tuple(range(contract)), 2 ** (bits - 1) - 1)
    return (codes * scale).astype(w.dtype)


def fake_quantize(w, bits: int, contract: int = 1):
    return w + jax.lax.stop_gradient(quantize_dequantize(w, bits, contract) - w)
