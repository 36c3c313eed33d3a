"""Cross-entropy over the vocabulary with an optional z-loss (PaLM, section 5)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits, targets, loss_mask, z_loss: float = 0.0):
    """(sum of masked per-token losses, sum of masked z-loss terms, number of counted tokens).

    Sums rather than means so that microbatches add up exactly to the full batch."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (log_z - target_logit) * loss_mask
    z_term = z_loss * jnp.square(log_z) * loss_mask
    return nll.sum(), z_term.sum(), loss_mask.sum()
