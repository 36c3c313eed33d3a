"""Sparse Mixture-of-Experts feed-forward block (Switch / GShard / Mixtral / DeepSeekMoE).

A linear router scores every token against E experts (softmax or sigmoid); each token goes to its top-k
experts and the outputs are summed with the (optionally renormalised) scores. Shared experts (DeepSeekMoE)
are an ordinary MLP that every token passes through.

Routing, the auxiliary losses and the capacity bookkeeping are computed on global arrays (the compiler
shards them like any activation); only the expert computation and the token exchange run per device, in
`maxmodel.parallel.experts` (a `jax.shard_map` with an all-to-all over the `expert` mesh axis).

Dispatch modes (`model.moe.capacity_factor`):
* 0 = dropless: token copies are sorted by expert and multiplied group by group with a grouped matmul
  (`model.moe.impl`: `jax.lax.ragged_dot`, or the megablox Pallas kernel on TPU; parallel/grouped_matmul.py).
* > 0 = capacity (GShard/Switch): each expert takes at most C = ceil(L·k/E · factor) copies per sequence
  (the group is one sequence, so what is dropped does not depend on the device layout); top-1 choices are
  served before top-2 ones, earlier tokens before later ones. An overflowing copy contributes nothing, the
  token keeps its residual. Dispatch and combine are einsums with a one-hot [B, L, E, C] tensor.

Auxiliary losses (per layer, averaged over tokens):
* load balancing (Switch, Mixtral): E · Σ_i f_i · P_i, f_i = share of token copies routed to expert i,
  P_i = mean router probability of expert i; equals 1 for perfectly uniform routing.
* router z-loss (ST-MoE): mean over tokens of logsumexp(logits)².
* aux-loss-free balancing (DeepSeek-V3, `bias_balancing`): a per-expert bias added to the scores for the
  choice of experts only (not to the weights); the train step nudges it by `bias_update_rate` · sign(mean
  load - load) after each step.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from maxmodel.config.schema import ModelConfig
from maxmodel.parallel.experts import capacity_experts, dropless_experts

from .layers import _ACTIVATIONS, MLP, with_adapter
from .sharding import constrain, param


class RouterBias(nnx.Variable):
    """DeepSeek-V3's balancing bias: state updated by the step from the expert load, never by gradients."""


def capacity(seq_len: int, num_experts: int, top_k: int, factor: float) -> int:
    """Token copies one expert takes per sequence in capacity mode."""
    return max(1, math.ceil(seq_len * top_k / num_experts * factor))


def route(logits, cfg, bias=None):
    """(expert ids [..., k], combine weights [..., k], router probabilities [..., E]) from logits [..., E]."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1) if cfg.router == "softmax" else jax.nn.sigmoid(logits)
    choose = probs if bias is None else probs + bias  # the bias steers the choice, not the weights
    _, ids = jax.lax.top_k(choose, cfg.top_k)
    weights = jnp.take_along_axis(probs, ids, axis=-1)
    if cfg.renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return ids, weights, probs


def load_balancing_loss(ids, probs, num_experts: int):
    """Switch/Mixtral auxiliary loss E · Σ f_i · P_i over all tokens; (loss, load f [E])."""
    counts = jnp.sum(jax.nn.one_hot(ids, num_experts, dtype=jnp.float32), axis=tuple(range(ids.ndim)))
    load = counts / (ids.size)
    p = probs / jnp.sum(probs, axis=-1, keepdims=True)  # sigmoid scores do not sum to 1
    mean_p = jnp.mean(p.reshape(-1, num_experts), axis=0)
    return num_experts * jnp.sum(load * mean_p), load


def router_z_loss(logits):
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def capacity_dispatch(ids, weights, num_experts: int, cap: int):
    """One-hot dispatch [B, L, E, C] and combine weights [B, L, E, C] per sequence, and the dropped share.

    Slot priority: all top-1 choices of the sequence, then all top-2 choices, ... (GShard); within a
    choice rank, token order."""
    b, l, k = ids.shape
    onehot = jax.nn.one_hot(ids, num_experts, dtype=jnp.int32)             # [B, L, k, E]
    by_rank = onehot.transpose(0, 2, 1, 3).reshape(b, k * l, num_experts)  # rank-major order
    position = (jnp.cumsum(by_rank, axis=1) - 1) * by_rank                 # slot within its expert
    position = position.reshape(b, k, l, num_experts).transpose(0, 2, 1, 3)
    kept = onehot * (position < cap)                                       # [B, L, k, E]
    slots = jax.nn.one_hot(jnp.sum(position * onehot, axis=-1), cap, dtype=jnp.float32)  # [B, L, k, C]
    dispatch = jnp.einsum("blke,blkc->blec", kept.astype(jnp.float32), slots)
    combine = jnp.einsum("blke,blkc,blk->blec", kept.astype(jnp.float32), slots, weights)
    dropped = 1.0 - jnp.sum(kept) / ids.size
    return dispatch, combine, dropped


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype=jnp.float32):
        m = cfg.moe
        self.moe = m
        self.act = _ACTIVATIONS[cfg.activation]
        gated = cfg.activation in ("swiglu", "geglu")
        e, d, f = m.num_experts, cfg.d_model, m.d_ff
        std_out = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.router = param(rngs, (d, e), ("embed", None), std=cfg.init_std, dtype=param_dtype)
        self.expert_wi = param(rngs, (e, d, f), ("exp", "embed", "exp_mlp"), std=cfg.init_std, dtype=param_dtype)
        self.expert_wg = (param(rngs, (e, d, f), ("exp", "embed", "exp_mlp"), std=cfg.init_std, dtype=param_dtype)
                          if gated else None)
        self.expert_wo = param(rngs, (e, f, d), ("exp", "exp_mlp", "embed"), std=std_out, dtype=param_dtype)
        self.shared = (MLP(dataclasses.replace(cfg, d_ff=m.shared_experts * f, use_bias=False), rngs, param_dtype)
                       if m.shared_experts else None)
        self.bias = RouterBias(jnp.zeros((e,), jnp.float32)) if m.bias_balancing else None

    def __call__(self, x):
        """x [B, L, D] -> (y [B, L, D], stats: load [E], dropped, aux_loss, z_loss, sent_rows: the token rows
        the expert exchange sent between devices, each way)."""
        m = self.moe
        logits = x @ self.router[...].astype(x.dtype)
        ids, weights, probs = route(logits, m, None if self.bias is None else self.bias[...])
        aux, load = load_balancing_loss(ids, probs, m.num_experts)
        stats = {"load": load, "aux_loss": aux, "z_loss": router_z_loss(logits)}
        w = [None if getattr(self, name) is None else with_adapter(self, name, x.dtype)
             for name in ("expert_wi", "expert_wg", "expert_wo")]
        if m.capacity_factor > 0:
            cap = capacity(x.shape[1], m.num_experts, m.top_k, m.capacity_factor)
            dispatch, combine, stats["dropped"] = capacity_dispatch(ids, weights, m.num_experts, cap)
            y, sent = capacity_experts(x, dispatch.astype(x.dtype), combine.astype(x.dtype), w, self.act)
        else:
            stats["dropped"] = jnp.zeros((), jnp.float32)
            y, sent = dropless_experts(x, ids, weights.astype(x.dtype), w, self.act, impl=m.impl,
                                       tiles=(m.tile_rows, m.tile_embed, m.tile_mlp), exchange=m.exchange)
        stats["sent_rows"] = sent.astype(jnp.float32)  # (float: the stats are averaged over microbatches)
        if self.shared is not None:
            y = y + self.shared(x)
        return constrain(y, ("activation_batch", "activation_length", "activation_embed")), stats


def update_router_bias(graphdef, params, load, rate: float):
    """DeepSeek-V3 aux-loss-free balancing: bias += rate · sign(mean load - load), per MoE layer.

    `load` is [num_moe_layers, E] in layer order; a scanned stack holds one MoE module whose bias is
    already [num_moe_layers, E], an unrolled one holds one module per MoE layer."""
    model = nnx.merge(graphdef, params)
    found = sorted(((tuple(int(p) if str(p).isdigit() else -1 for p in path), m)
                    for path, m in nnx.iter_modules(model) if isinstance(m, MoE) and m.bias is not None),
                   key=lambda item: item[0])
    biases = [m for _, m in found]
    step = rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
    if len(biases) == 1 and biases[0].bias[...].ndim == 2:
        biases[0].bias[...] = biases[0].bias[...] + step
    else:
        for i, m in enumerate(biases):
            m.bias[...] = m.bias[...] + step[i]
    return nnx.split(model)[1]
