"""Prompt tuning (Lester et al. 2021): k trainable virtual-token embeddings in front of every document's input
embeddings; everything else frozen. `peft.num_prompts` tables live side by side, and each position picks its
own with the `task` batch array, so rows of different tasks share one batch and one compiled step.

Two ways in, one mechanism (`SoftPrompt.fill`, which puts table rows where `prompt_slots` says):
- From the data pipeline (data/packing.py, `virtual=k`): every document already starts with k placeholder
  inputs marked 1..k in `prompt_slots`, with `task` per position (a mixture component's `task`). Packed rows
  then give each document its own prompt, at its own positions 0..k-1, inside the row's length.
- Without slots (a batch of plain tokens, as in generation or synthetic data): the k virtual tokens are
  prepended to the row (positions 0..k-1, the real tokens move up by k, the segment id of the row's first
  token) and the first k outputs are dropped before the head, so losses keep their [B, L] shapes.
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

    def fill(self, x, slots, task):
        """x [B, L, d] with every slot (slots [B, L]: 1..k, 0 = a real token) replaced by row slot-1 of its
        position's table (task: [B, L], [B] or None for table 0)."""
        table = self.table[...].astype(x.dtype)
        if task is None:
            task = jnp.zeros_like(slots)
        elif task.ndim == 1:
            task = jnp.broadcast_to(task[:, None], slots.shape)
        rows = table[task, jnp.maximum(slots - 1, 0)]
        return jnp.where((slots > 0)[..., None], rows, x)

    def prepend(self, x, segment_ids, positions, prefix, task):
        b, k = x.shape[0], self.length
        if task is not None and task.ndim == 2:
            task = task[:, 0]
        slots = jnp.broadcast_to(jnp.arange(1, k + 1, dtype=jnp.int32), (b, k))
        x = jnp.concatenate([jnp.zeros((b, k, x.shape[-1]), x.dtype), x], axis=1)
        x = self.fill(x, jnp.concatenate([slots, jnp.zeros((b, x.shape[1] - k), jnp.int32)], axis=1), task)
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
