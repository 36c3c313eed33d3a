"""Prompt tuning (Lester et al. 2021): k trainable virtual-token embeddings prepended to every row's input
embeddings; everything else frozen. `peft.num_prompts` tables live side by side, and each row picks its own
with the `task` batch array (one id per row; [B] or [B, L] with the id repeated), so rows of different tasks
share one batch and one compiled step.

The virtual tokens take positions 0..k-1 and the real tokens move up by k (RoPE / learned tables see one
longer sequence); they carry the segment id of the row's first token, so with packing they condition the
row's first document (the others keep their own masks). The stack runs on L + k positions and the first k
are dropped before the head, so losses, targets and masks keep their [B, L] shapes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

ATTR = "soft_prompt"


class SoftPrompt(nnx.Module):
    def __init__(self, table):
        self.table = nnx.LoRAParam(table)  # the adapter variable type: the only thing the step trains

    @property
    def length(self) -> int:
        return self.table.shape[1]

    def prepend(self, x, segment_ids, positions, prefix, task):
        b, k = x.shape[0], self.length
        table = self.table[...].astype(x.dtype)
        if task is None:
            rows = jnp.broadcast_to(table[0], (b, *table.shape[1:]))
        else:
            task = task[:, 0] if task.ndim == 2 else task
            rows = jnp.take(table, task, axis=0)
        x = jnp.concatenate([rows, x], axis=1)
        segment_ids = jnp.concatenate([jnp.repeat(segment_ids[:, :1], k, axis=1), segment_ids], axis=1)
        positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(k, dtype=positions.dtype), (b, k)),
                                     positions + k], axis=1)
        if prefix is not None:
            prefix = jnp.concatenate([jnp.zeros((b, k), prefix.dtype), prefix], axis=1)
        return x, segment_ids, positions, prefix


def attach_prompt(model, cfg, rngs: nnx.Rngs):
    p, m = cfg.peft, cfg.model
    shape = (p.num_prompts, p.num_virtual_tokens, m.d_model)
    init = nnx.with_partitioning(lambda k, s, d: m.init_std * jax.random.normal(k, s, d), (None, None, "embed"))
    table = init(rngs.params(), shape, model.embed.table[...].dtype)
    setattr(model, ATTR, SoftPrompt(table))
    return model
