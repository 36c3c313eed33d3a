"""Houlsby adapters (Houlsby et al. 2019): a bottleneck y + up(gelu(down(y))) on the output of every block's
attention and of its MLP (before the residual add, and before Gemma-style post norms). The up-projection starts
at zero, so a model with fresh adapters is exactly its base. Attached after the model is built like LoRA
(lora.py): a scanned stack's blocks carry a leading `layers` axis and so do their adapters; arrays are
nnx.LoRAParam, the variable type the step trains; d_model axes are sharded like the model's `embed`.
"""
from __future__ import annotations

import jax
from flax import nnx

from maxmodel.models.layers import dense

SITES = ("attn", "mlp")  # Block calls layers.adapt(self, site, y) on these two outputs


class Bottleneck(nnx.Module):
    def __init__(self, down, down_bias, up, up_bias):
        self.down, self.down_bias = nnx.LoRAParam(down), nnx.LoRAParam(down_bias)
        self.up, self.up_bias = nnx.LoRAParam(up), nnx.LoRAParam(up_bias)

    def __call__(self, y):
        h = jax.nn.gelu(dense(y, self.down[...].astype(y.dtype)) + self.down_bias[...].astype(y.dtype))
        return y + dense(h, self.up[...].astype(y.dtype)) + self.up_bias[...].astype(y.dtype)


def attach_adapters(model, cfg, rngs: nnx.Rngs):
    d, r = cfg.model.d_model, cfg.peft.adapter_dim
    blocks = [mod for _, mod in nnx.iter_modules(model) if type(mod).__name__ == "Block"]
    key = rngs.params()
    for i, block in enumerate(blocks):
        scale = block.attn_norm.scale
        lead = scale[...].ndim - 1  # 1 in a scanned stack (the `layers` axis), 0 unrolled
        lead_shape, lead_axes = scale[...].shape[:lead], tuple(scale.get_metadata().get("out_sharding") or
                                                               (None,) * scale[...].ndim)[:lead]
        dtype = scale[...].dtype
        for j, site in enumerate(SITES):
            k = jax.random.fold_in(key, 2 * i + j)

            def make(init, shape, axes, k=k):
                return nnx.with_partitioning(init, (*lead_axes, *axes))(k, (*lead_shape, *shape), dtype)
            normal = nnx.initializers.normal(cfg.model.init_std)
            zeros = nnx.initializers.zeros_init()
            setattr(block, site + "_adapter", Bottleneck(make(normal, (d, r), ("embed", None)),
                                                         make(zeros, (r,), (None,)),
                                                         make(zeros, (r, d), (None, "embed")),
                                                         make(zeros, (d,), ("embed",))))
    return model


