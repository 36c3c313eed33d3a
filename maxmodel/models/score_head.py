"""A scalar head on a transformer: score = w . h + b on the final hidden state h (the reward model's head; PPO's
value head is the same piece). `model.score_head=true` attaches it (build_model; train.objective=reward turns
it on), so a model directory with a head exports and loads like any other. It starts at zero: every score is 0
at first (the Bradley-Terry loss ln 2), and attaching it to an exported language model needs no random numbers
(export.load_params fills a missing head with zeros). A document's score is read at its last position, whose
hidden state has seen the whole prompt and response."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .sharding import constant_param

HEAD = "score_head"  # the attribute (and parameter path) of the head


class ScoreHead(nnx.Module):
    def __init__(self, d_model: int, dtype=jnp.float32):
        self.w = constant_param((d_model,), ("embed",), 0.0, dtype)
        self.b = constant_param((1,), (None,), 0.0, dtype)

    def __call__(self, h):
        """[..., d_model] -> [...] float32."""
        return jnp.einsum("...d,d->...", h.astype(jnp.float32), self.w[...].astype(jnp.float32)) + \
            self.b[...].astype(jnp.float32)[0]


def attach_score_head(model, cfg):
    setattr(model, HEAD, ScoreHead(cfg.model.d_model, getattr(jnp, cfg.train.param_dtype)))
    return model


def has_score_head(model) -> bool:
    return vars(model).get(HEAD) is not None


def token_scores(model, batch: dict):
    """The head's score at every position [B, L] (no vocabulary projection is computed)."""
    h, _ = model.hidden(batch["inputs"], batch["segment_ids"], batch["positions"])
    return getattr(model, HEAD)(h)


def document_onehot(segment_ids, max_docs: int):
    """[B, L, D] float32: 1 where the position belongs to document d + 1 of its row (segment ids 1..D)."""
    return (segment_ids[..., None] == jnp.arange(1, max_docs + 1)).astype(jnp.float32)


def last_positions(segment_ids, positions, max_docs: int):
    """[B, L] bool: the last position of every document, the one whose position (restarting at 0 in each
    segment) is its length - 1. Read from the positions, not from the neighbouring column, so it holds when
    the step has permuted the sequence (ring attention's load balancing)."""
    onehot = document_onehot(segment_ids, max_docs)
    length = jnp.einsum("bld,bd->bl", onehot, jnp.sum(onehot, axis=1))
    return (segment_ids > 0) & (positions == length - 1)


def document_scores(scores, segment_ids, positions, max_docs: int):
    """[B, D] each document's score at its last position (0 for an absent document)."""
    at_end = jnp.where(last_positions(segment_ids, positions, max_docs), scores, 0.0)
    return jnp.einsum("bl,bld->bd", at_end, document_onehot(segment_ids, max_docs))


def zero_head_like(abstract_head):
    """A zero head with the abstract head's shapes, dtypes and shardings (a language model given a new head)."""
    return jax.tree.map(lambda x: jax.jit(lambda: jnp.zeros(x.shape, x.dtype), out_shardings=x.sharding)(),
                        abstract_head)


def split_head(state):
    """(head state, the rest) of a parameter state."""
    return nnx.split_state(state, nnx.PathContains(HEAD), ...)
