"""Quantization-aware training (train.qat=int8|int4): every projection weight (q k v o gate up down, the
weights layers.project() multiplies) is fake-quantized in the forward pass, symmetric per output channel like
int8/int4 inference, with straight-through gradients: w + stop_gradient(q(w) - w) is q(w) forward and has
gradient 1 with respect to w backward (Bengio et al. 2013; Jacob et al. 2018), so training moves the float
weights to where their quantized forms do well. The float weights stay the trained state; `qat_bits` is a
static attribute of the owning module (in the graph definition, not the state), so checkpoints and the
step's state are those of the float model.

Why not qwix's QAT provider: like its LoRA provider it intercepts dot/einsum calls on Param attributes of the
calling module, which maxmodel's 2-D `dense` over reshaped, scanned weights never makes (see peft/lora.py).
"""
from __future__ import annotations

import jax

from maxmodel.models.quant import quantize_dequantize

BITS = {"int8": 8, "int4": 4}


def attach_qat(model, cfg):
    from .peft.config import TARGETS
    from .peft.targets import targets_of
    bits = BITS[cfg.train.qat]
    for module in {id(m): m for m, *_ in targets_of(model, tuple(TARGETS))}.values():
        module.qat_bits = bits
    return model


def quantized_copy(model, bits: int):
    """The model with every projection weight replaced by its quantized round trip, in place (to measure
    what int8/int4 inference of it loses)."""
    from .peft.config import TARGETS
    from .peft.targets import targets_of
    for module, attr, contract, lead in targets_of(model, tuple(TARGETS)):
        w = getattr(module, attr)
        fn = lambda x, c=contract: quantize_dequantize(x, bits, c)
        for _ in range(lead):
            fn = jax.vmap(fn)
        w[...] = fn(w[...])
    return model
