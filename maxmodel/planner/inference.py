"""Inference-aware sizing (Sardana, Portes, Doubov, Frankle 2024, "Beyond Chinchilla-Optimal: Accounting for
Inference in Language Model Scaling Laws").

For a model that will serve T tokens, minimise lifetime FLOPs 6·N·D_train + 2·N·T subject to reaching the same
loss as the compute-optimal model for the training budget: the answer is a smaller model trained longer.
"""
from __future__ import annotations

from maxmodel.config.errors import ConfigError

from .laws import minimise_log, tokens_for_loss


def plan_inference(law, flops: float, inference_tokens: float) -> dict:
    if law.loss is None:
        raise ConfigError("--inference-tokens", f"law '{law.name}' has no loss surface; use chinchilla-3, "
                                                "epoch or kaplan")
    if inference_tokens < 0:
        raise ConfigError("--inference-tokens", f"must be >= 0, got {inference_tokens}")
    n0, d0 = law.optimal(flops)
    target = law.loss(n0, d0)

    def lifetime(n):
        d = tokens_for_loss(law, n, target)
        return 6 * n * d + 2 * n * inference_tokens

    # The loss is reachable only above the size where A/N^alpha alone uses the whole gap, so search from n0/1e4
    # (lifetime is inf below that) up to n0: a model larger than compute-optimal never saves FLOPs.
    n = minimise_log(lifetime, n0 / 1e4, n0)
    d = tokens_for_loss(law, n, target)
    baseline = 6 * n0 * d0 + 2 * n0 * inference_tokens
    best = 6 * n * d + 2 * n * inference_tokens
    return {
        "params": n, "tokens": d, "loss": target, "inference_tokens": inference_tokens,
        "train_flops": 6 * n * d, "inference_flops": 2 * n * inference_tokens, "lifetime_flops": best,
        "chinchilla": {"params": n0, "tokens": d0, "lifetime_flops": baseline},
        "flops_saved": baseline - best, "flops_saved_fraction": (baseline - best) / baseline,
        "source": "Sardana et al. 2024: minimise 6·N·D + 2·N·T at equal loss",
    }
