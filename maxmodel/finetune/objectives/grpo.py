"""GRPO (Shao et al. 2024, DeepSeekMath; DeepSeek-R1's RL stage): critic-free policy optimisation. Each
prompt's G sampled completions are scored; a completion's advantage is its reward relative to its group
(rl/rewards.py::group_advantages), on every one of its tokens. The loss is PPO's clipped surrogate on the
per-token importance ratio π/π_old, clipped to [1 - ε, 1 + ε_high] (DAPO's clip-higher when ε_high > ε),
plus β·KL(π || π_ref) per token with the k1 or k3 estimator (β = 0: no reference at all).

Aggregation (rl.loss_agg), as the step divides the summed loss by the summed count:
- grpo: each sequence's token mean, then the mean over sequences (the paper's 1/G Σ 1/|o_i| Σ_t);
- dapo: one mean over every completion token of the batch (long completions weigh more);
- dr_grpo: the token sum over G · max_new_tokens, a constant (Dr. GRPO: no length bias).
The batch comes from rl/rollout.py (one row per completion, advantages broadcast over its tokens).
"""
import jax.numpy as jnp

from .base import Objective, token_logps

KEYS = ("old_logps", "ref_logps", "advantages")
METRICS = ("kl", "clip_fraction", "ratio")


def token_weights(mask, agg: str, max_new_tokens: int):
    """(per-token weights, count): Σ weights·loss / Σ count is the configured aggregate."""
    per_row = mask.sum(axis=1, keepdims=True)
    rows = (per_row[:, 0] > 0).sum()
    if agg == "grpo":
        return mask / jnp.maximum(per_row, 1.0), rows.astype(jnp.float32)
    if agg == "dr_grpo":
        return mask, (rows * max_new_tokens).astype(jnp.float32)
    return mask, mask.sum()


def kl_terms(logp, ref, estimator: str):
    """Per-token KL(π || π_ref) estimates from samples of π: k1 = log π/π_ref; k3 = r - log r - 1 with
    r = π_ref/π (Schulman 2020; unbiased and never negative)."""
    if estimator == "k1":
        return logp - ref
    d = ref - logp
    return jnp.exp(d) - d - 1.0


def clipped_surrogate(logp, old, adv, eps_low: float, eps_high: float):
    """(per-token loss, ratio, where the clip binds)."""
    ratio = jnp.exp(logp - old)
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = -jnp.minimum(ratio * adv, clipped * adv)
    binds = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
    return loss, ratio, binds


def loss(model, batch, settings):
    rl = settings.cfg.rl
    mask = batch["loss_mask"].astype(jnp.float32)
    logp = token_logps(model, batch)
    per_token, ratio, binds = clipped_surrogate(logp, batch["old_logps"], batch["advantages"], rl.epsilon,
                                                rl.epsilon_high or rl.epsilon)
    kl = kl_terms(logp, batch["ref_logps"], rl.kl_estimator) * mask
    if rl.beta:
        per_token = per_token + rl.beta * kl
    w, count = token_weights(mask, rl.loss_agg, rl.max_new_tokens)
    total = jnp.sum(w * per_token)
    metrics = {"kl": jnp.sum(w * kl), "clip_fraction": jnp.sum(w * binds), "ratio": jnp.sum(w * ratio)}
    return total, total, count, {}, metrics


OBJECTIVE = Objective("grpo", loss, archs=("decoder",), extra_keys=KEYS, formats=("prompt",), metrics=METRICS,
                      prepare=lambda cfg, ts, mesh, data: _rollouts(cfg, ts, mesh, data))


def _rollouts(cfg, ts, mesh, data):
    from maxmodel.finetune.rl.rollout import Rollouts
    return Rollouts(cfg, ts, mesh, data)
