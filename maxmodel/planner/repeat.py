"""Data-constrained allocation (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models").

With U unique tokens seen for D >= U tokens in total, repeated tokens are worth less. Eq. 5 of the paper:
effective data D' = U + U·R_D*·(1 − exp(−R_D / R_D*)) with R_D = D/U − 1 repetitions; likewise parameters
beyond U_N (the size for which U tokens are compute-optimal) count as N' = U_N + U_N·R_N*·(1 − exp(−R_N/R_N*)),
R_N = N/U_N − 1. The loss is the base law's L(N', D').

The paper fitted the decay constants jointly with its own base law (laws.LAWS["muennighoff"]); with that law
the released unrounded constants are used, and the README's examples of its repository are reproduced. Any
other base law with a loss surface (`--law chinchilla-3`, ...) is combined with the rounded constants the
paper prints (R_D* = 15.4, R_N* = 5.3, Section 6): a combination, not a joint fit.
"""
from __future__ import annotations

import math

from maxmodel.config.errors import ConfigError

from .laws import minimise_log

R_D_STAR = 15.4   # printed (rounded) in Section 6
R_N_STAR = 5.3
# Decay constants fitted together with a base law: law name -> (R_D*, R_N*).
JOINT_FITS = {"muennighoff": (15.387756, 5.309743)}


def decay_constants(law) -> tuple[float, float, str]:
    """(R_D*, R_N*, where they come from) for `law`."""
    if law.name in JOINT_FITS:
        r_d, r_n = JOINT_FITS[law.name]
        return r_d, r_n, f"Muennighoff et al. 2023, eq. 5, jointly fitted R_D*={r_d}, R_N*={r_n}"
    return R_D_STAR, R_N_STAR, (f"Muennighoff et al. 2023, eq. 5 with the printed R_D*={R_D_STAR}, "
                                f"R_N*={R_N_STAR} on the {law.name} base law (a combination, not a joint fit)")


def effective(unique: float, total: float, r_star: float) -> float:
    """Effective count for `total` draws from `unique` items under exponential decay of repeated value."""
    if total <= unique:
        return total
    repeats = total / unique - 1
    return unique + unique * r_star * (1 - math.exp(-repeats / r_star))


def params_for_unique_tokens(law, unique: float) -> float:
    """U_N: the model size for which `unique` tokens is the compute-optimal token count."""
    lo, hi = 1e3, 1e40
    for _ in range(300):
        mid = math.sqrt(lo * hi)
        if law.optimal(mid)[1] < unique:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-12:
            break
    return law.optimal(hi)[0]


def constrained_loss(law, params: float, tokens: float, unique: float) -> tuple[float, float, float]:
    """(loss, effective params N', effective tokens D')."""
    r_d, r_n, _ = decay_constants(law)
    u_n = min(params, params_for_unique_tokens(law, unique))
    n_eff = effective(u_n, params, r_n)
    d_eff = effective(unique, tokens, r_d)
    return law.loss(n_eff, d_eff), n_eff, d_eff


def plan_constrained(law, flops: float, unique: float) -> dict:
    """The (N, D) with 6ND = flops that minimises the data-constrained loss, and what repeating costs."""
    if law.loss is None:
        raise ConfigError("--unique-tokens", f"law '{law.name}' has no loss surface; use muennighoff, "
                                             "chinchilla-3, epoch or kaplan")
    if unique <= 0:
        raise ConfigError("--unique-tokens", f"must be > 0, got {unique}")
    n_free, d_free = law.optimal(flops)

    def loss_at(n):
        return constrained_loss(law, n, flops / (6 * n), unique)[0]

    n = minimise_log(loss_at, n_free / 1e3, n_free * 1e3)
    d = flops / (6 * n)
    loss, n_eff, d_eff = constrained_loss(law, n, d, unique)
    return {
        "params": n, "tokens": d, "unique_tokens": unique, "epochs": d / unique,
        "effective_params": n_eff, "effective_tokens": d_eff,
        "loss": loss,
        # What the same N and D would reach if every token were fresh: the price of repeating.
        "loss_if_unique": law.loss(n, d),
        "repeat_penalty": loss - law.loss(n, d),
        "unconstrained": {"params": n_free, "tokens": d_free, "loss": law.loss(n_free, d_free),
                          "epochs": d_free / unique},
        "source": decay_constants(law)[2],
    }
