"""Cross-entropy over the vocabulary with an optional z-loss (PaLM, section 5)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits, targets, loss_mask, z_loss: float = 0.0, one_hot: bool = False):
    """(sum of masked per-token losses, sum of masked z-loss terms, number of counted tokens).

    Sums rather than means so that microbatches add up exactly to the full batch. `one_hot` picks the target
    logits by a product with one-hot rows (the same values) instead of a gather: inside a pipeline stage's
    shard_map a gather along a vocab axis sharded over `tensor` trips XLA's SPMD partitioner."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    if one_hot:
        target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), axis=-1)
    else:
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (log_z - target_logit) * loss_mask
    z_term = z_loss * jnp.square(log_z) * loss_mask
    return nll.sum(), z_term.sum(), loss_mask.sum()
