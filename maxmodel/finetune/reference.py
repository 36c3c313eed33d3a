"""The frozen reference policy of preference and RL objectives (DPO's π_ref, the KL anchor of PPO / GRPO), as
per-token log-probs of a batch's targets, computed on the run's mesh before the step (a Preparer adds them to
the batch as `ref_logps`).

With adapters (peft.method lora / qlora / adapter) the reference is the frozen base itself: the policy's own
parameter state with every adapter zeroed inside the jitted forward (a zero LoRA B, a zero bottleneck), so no
second copy of the weights exists. In full training it is a frozen copy of the starting weights (init.from, or
the seeded initialisation), restored again on resume rather than taken from the checkpoint.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from maxmodel.config.errors import ConfigError

from .objectives import token_logps


def _without_adapters(params):
    """The parameter state with every adapter array zeroed: the base model's function."""
    adapters, rest = nnx.split_state(params, nnx.LoRAParam, ...)
    return nnx.merge_state(jax.tree.map(jnp.zeros_like, adapters), rest)


class Reference:
    """`ref(params, batch)` -> [B, L] float32 log p_ref(target), sharded like the batch. `params` is the
    policy's current state; it is read only with adapters (the base inside it is the reference)."""

    def __init__(self, cfg, ts, mesh):
        from maxmodel.train.step import batch_sharding, fused_loss_chunk
        self.graphdef = ts.graphdef
        self.copy = None
        if cfg.peft.method == "prompt":
            raise ConfigError("peft.method", "soft prompts have no adapter-free reference inside the model; "
                                             "use lora, qlora, adapter or none with a reference-based objective")
        if cfg.peft.method == "none":
            self.copy = _starting_params(cfg, ts)
        out = batch_sharding(mesh)
        graphdef = ts.graphdef
        chunk = fused_loss_chunk(cfg, mesh)  # the step's chunked head: no [B, L, V] logits here either

        def logps(params, batch):
            state = params if self.copy is not None else _without_adapters(params)
            return token_logps(nnx.merge(graphdef, state), batch, chunk)
        self._logps = jax.jit(logps, in_shardings=(ts.param_shardings, None), out_shardings=out)
        self.replicated = NamedSharding(mesh, PartitionSpec())

    def __call__(self, params, batch):
        return self._logps(self.copy if self.copy is not None else params, batch)


def _starting_params(cfg, ts):
    """The weights full training starts from: the init.from export, or the seeded initialisation."""
    from maxmodel.train.checkpoint import abstract_like
    from maxmodel.train.export import load_params
    from maxmodel.train.step import abstract_state, create_params
    if cfg.init.from_:
        _, abstract = abstract_state(cfg)
        return load_params(cfg.init.from_, abstract_like(abstract, ts.param_shardings))
    return create_params(cfg, ts.param_shardings)
