"""LoRA (Hu et al. 2021): a frozen weight W [*in, *out] gains a trainable low-rank update, y = x W + s (x A) B
with A [*in, r], B [r, *out], B = 0 at the start (so the model starts as the base) and s = alpha / r, or
alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023). With `peft.dropout` > 0 the adapter sees x through dropout
(PEFT's lora_dropout: y = x W + s (drop(x) A) B), in training only.

Adapters are `Adapter` modules attached to the module that owns the weight, as attribute `<weight>_lora`;
their arrays are nnx.LoRAParam, the variable type the step trains (train/step.py's SplitStep), so the base
keeps no gradient or optimizer state. Attached after the model is built, they follow whatever stacking it
has: a scanned stack's weights carry a leading `layers` axis and so do their adapters, which is how they go
through nnx.scan and the pipeline unchanged. Each adapter is sharded like its base weight: A keeps the
weight's input axes, B its output axes, the rank axis is replicated.

Why not qwix (its LoRA provider intercepts jnp.dot / einsum calls whose right operand is an nnx.Param
attribute of the calling module): maxmodel's `dense` multiplies `w[...]` reshaped to 2-D, so nothing it
sees is a Param attribute, and its stacks are scanned; see benchmarks/RESULTS.md.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from maxmodel.config.errors import ConfigError
from maxmodel.models.layers import ADAPTER_SUFFIX as SUFFIX
from maxmodel.models.layers import dense

from .config import target_names
from .targets import axes_of, targets_of

def scaling(p) -> float:
    return p.alpha / (math.sqrt(p.rank) if p.rslora else p.rank)


class DropoutSeed(nnx.Variable):
    """A LoRA adapter's dropout key data (uint32 [*stacked dims, key size]): one key per layer of a stack, since
    a scanned or pipelined stack runs one Python adapter for all its layers. Frozen: the train step folds its
    step number into it (`for_step`), so every step, microbatch and layer draws its own mask and a resumed run
    draws the masks an uninterrupted one would have."""


class Adapter(nnx.Module):
    """The low-rank update of one weight: (x A) B times `scale`; `contract` input dims of x meet A. With a
    dropout rate the input first goes through nnx.Dropout, built deterministic (inference, evaluation and
    references see no dropout) and switched on by the train step's `model.train()`."""

    def __init__(self, a, b, scale: float, contract: int, dropout: float = 0.0, seed=None):
        self.a, self.b = nnx.LoRAParam(a), nnx.LoRAParam(b)
        self.scale, self.contract = scale, contract
        if dropout:
            self.drop = nnx.Dropout(dropout, deterministic=True)
            self.seed = seed

    def __call__(self, x):
        if hasattr(self, "drop"):
            x = self.drop(x, rngs=jax.random.wrap_key_data(self.seed[...]))
        h = dense(x, self.a[...].astype(x.dtype), self.contract)
        return dense(h, self.b[...].astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)

    def delta(self):
        """The update as a dense weight [*lead, *in, *out] (for merging)."""
        a, b = self.a[...], self.b[...]
        r = a.shape[-1]
        lead = a.ndim - 1 - self.contract
        flat = jnp.einsum("...ir,...ro->...io", a.reshape(*a.shape[:lead], -1, r), b.reshape(*b.shape[:lead], r, -1))
        return (flat * self.scale).reshape(*a.shape[:-1], *b.shape[lead + 1:])


def attach_lora(model, cfg, rngs: nnx.Rngs):
    p = cfg.peft
    names = target_names(p.targets)
    found = targets_of(model, names)
    if not found:
        raise ConfigError("peft.targets", f"{list(names)} match no weight of this model "
                                          f"(model.arch={cfg.model.arch}, MoE: {cfg.model.moe.num_experts > 0})")
    key = rngs.params()
    for i, (module, attr, contract, lead) in enumerate(found):
        w = getattr(module, attr)
        shape, axes, dtype = w[...].shape, axes_of(w), w[...].dtype
        ins, outs = shape[lead:lead + contract], shape[lead + contract:]
        fan_in = math.prod(ins)
        # PEFT's default A: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)); B = 0
        bound = 1 / math.sqrt(fan_in)
        a = nnx.with_partitioning(lambda k, s, d, bound=bound: jax.random.uniform(k, s, d, -bound, bound),
                                  (*axes[:lead + contract], None))(
            jax.random.fold_in(key, i), (*shape[:lead + contract], p.rank), dtype)
        b = nnx.with_partitioning(nnx.initializers.zeros_init(), (*axes[:lead], None, *axes[lead + contract:]))(
            key, (*shape[:lead], p.rank, *outs), dtype)
        seed = None
        if p.dropout:
            keys = jax.random.split(jax.random.fold_in(key, len(found) + i), max(1, math.prod(shape[:lead])))
            data = jax.random.key_data(keys).reshape(*shape[:lead], -1)
            seed = DropoutSeed(data, out_sharding=(*axes[:lead], None))
        setattr(module, attr + SUFFIX, Adapter(a, b, scaling(p), contract, p.dropout, seed))
    return model


def for_step(frozen: nnx.State, *numbers) -> nnx.State:
    """The frozen state with the step's `numbers` (step, microbatch) folded into every LoRA dropout seed; the
    state itself when there are none."""
    seeds, rest = nnx.split_state(frozen, DropoutSeed, ...)
    if not jax.tree.leaves(seeds):
        return frozen

    def fold(data):
        def one(d):
            k = jax.random.wrap_key_data(d)
            for n in numbers:
                k = jax.random.fold_in(k, n)
            return jax.random.key_data(k)
        return jax.vmap(one)(data.reshape(-1, data.shape[-1])).reshape(data.shape)
    return nnx.merge_state(jax.tree.map(fold, seeds), rest)


def merge(model):
    """Fold every adapter into its weight and detach it: the model is then a plain (peft.method=none) one.
    A QLoRA base (qlora.py) is dequantized first, so the merged weights are float ones."""
    from .qlora import dequantize_base
    dequantize_base(model)
    for _, module in list(nnx.iter_modules(model)):
        for name in [n for n in vars(module) if n.endswith(SUFFIX)]:
            adapter = getattr(module, name)
            w = getattr(module, name[:-len(SUFFIX)])
            w[...] = (w[...] + adapter.delta().astype(w[...].dtype))
            delattr(module, name)
    return model
