"""Symmetric integer quantization, the one rule behind inference weights (inference/quantize.py), QLoRA's
int8 base (finetune/peft/qlora.py) and quantization-aware training (finetune/qat.py)."""
from __future__ import annotations

import jax.numpy as jnp


def symmetric_quantize(w, axes: tuple[int, ...], qmax: float):
    """(codes, scale): codes are w / scale rounded into [-qmax, qmax] (float32, still to be cast), scale
    (float32, keepdims over `axes`) maps each slice's absmax to qmax; an all-zero slice gets scale 1."""
    w32 = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w32), axis=axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / qmax, 1.0)
    return jnp.clip(jnp.round(w32 / scale), -qmax, qmax), scale
