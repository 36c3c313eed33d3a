"""A peft run's parameter state as the plain model's: every adapter folded into its weight (for export)."""
from __future__ import annotations

from flax import nnx


def merged_params(cfg, params):
    """The parameter state with every adapter folded into its weight, shaped like a peft.method=none model's
    (jitted where the shards are: nothing gathers on one device). Call under the run's mesh + rules."""
    import dataclasses

    import jax

    from maxmodel.finetune.peft.lora import merge

    from .step import abstract_state
    graphdef, _ = abstract_state(cfg)
    _, base = abstract_state(dataclasses.replace(cfg, peft=dataclasses.replace(cfg.peft, method="none")))

    def fold(state):
        return nnx.split(merge(nnx.merge(graphdef, state)))[1]
    return jax.jit(fold, out_shardings=jax.tree.map(lambda x: x.sharding, base))(params)
