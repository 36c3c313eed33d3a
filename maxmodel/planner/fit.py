"""Fit a scaling law to your own runs, as Hoffmann et al. 2022 did (Appendix D.2 and Section 3.2).

Approach 3: minimise sum_i Huber_delta(LSE(a − alpha·log N_i, b − beta·log D_i, e) − log L_i) over
(a, b, e, alpha, beta) with L-BFGS, delta = 1e-3, started from the paper's grid alpha, beta ∈ {0, 0.5, ..., 2},
e ∈ {−1, −0.5, ..., 1}, a, b ∈ {0, 5, ..., 25}; then A, B, E = exp(a), exp(b), exp(e). The Huber terms are
summed, not averaged (averaging made the original fit stop early, Besiroglu et al. 2024). To keep it fast,
every grid point is scored and L-BFGS runs from the best `starts` of them. Intervals come from a bootstrap
over runs.

Approach 2: where runs share a FLOP budget, fit a parabola of loss against log N per budget, take its vertex
as N_opt(C), and fit N_opt ∝ C^a across budgets.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from maxmodel.config.errors import ConfigError

DELTA = 1e-3
GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5), "e": np.arange(-1.0, 1.01, 0.5),
    "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0),
}


def _objective(theta, log_n, log_d, log_l, delta=DELTA):
    """Summed Huber loss of the log-sum-exp prediction, and its gradient; theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    u = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    m = u.max(axis=0)
    lse = m + np.log(np.exp(u - m).sum(axis=0))
    r = lse - log_l
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    dr = np.clip(r, -delta, delta)
    w = np.exp(u - lse)
    grad = np.array([(dr * w[0]).sum(), (dr * w[1]).sum(), (dr * w[2]).sum(),
                     -(dr * w[0] * log_n).sum(), -(dr * w[1] * log_d).sum()])
    return loss, grad


def _grid_scores(log_n, log_d, log_l):
    keys = ("a", "b", "e", "alpha", "beta")
    thetas = np.array(list(itertools.product(*(GRID[k] for k in keys))))
    a, b, e, al, be = (thetas[:, i:i + 1] for i in range(5))
    u1, u2 = a - al * log_n, b - be * log_d
    u3 = np.broadcast_to(e, u1.shape)
    m = np.maximum(np.maximum(u1, u2), u3)
    r = m + np.log(np.exp(u1 - m) + np.exp(u2 - m) + np.exp(u3 - m)) - log_l
    huber = np.where(np.abs(r) <= DELTA, 0.5 * r**2, DELTA * (np.abs(r) - 0.5 * DELTA)).sum(axis=1)
    return thetas, huber


def _lbfgs(theta0, log_n, log_d, log_l):
    from scipy.optimize import minimize

    res = minimize(_objective, theta0, args=(log_n, log_d, log_l), jac=True, method="L-BFGS-B",
                   options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-10})
    return res.x, res.fun


def fit_parametric_theta(params, tokens, loss, starts: int = 8, inits=None):
    log_n, log_d, log_l = np.log(params), np.log(tokens), np.log(loss)
    if inits is None:
        thetas, scores = _grid_scores(log_n, log_d, log_l)
        inits = thetas[np.argsort(scores)[:starts]]
    best = min((_lbfgs(t, log_n, log_d, log_l) for t in inits), key=lambda x: x[1])
    return best[0]


def _named(theta) -> dict:
    a, b, e, alpha, beta = (float(x) for x in theta)
    out = {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}
    out["a"] = beta / (alpha + beta) if alpha + beta > 0 else float("nan")
    out["b"] = alpha / (alpha + beta) if alpha + beta > 0 else float("nan")
    return out


def _optimal_params(p: dict, flops: float) -> float:
    g = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / (p["alpha"] + p["beta"]))
    return g * (flops / 6) ** p["a"]


def isoflop(runs: list[dict], rel_tol: float = 0.05) -> dict | None:
    """Approach 2 on runs grouped by FLOP budget (the `flops` column, else 6·N·D within `rel_tol`)."""
    budgets = sorted((((r.get("flops") or 6 * r["params"] * r["tokens"]), r) for r in runs), key=lambda x: x[0])
    groups: list[list] = []
    for c, r in budgets:
        if groups and c <= groups[-1][0][0] * (1 + rel_tol):
            groups[-1].append((c, r))
        else:
            groups.append([(c, r)])
    out = []
    for g in groups:
        if len({r["params"] for _, r in g}) < 3:
            continue
        c = float(np.exp(np.mean([np.log(c) for c, _ in g])))
        x = np.log([r["params"] for _, r in g])
        y = np.array([r["loss"] for _, r in g])
        k2, k1, k0 = np.polyfit(x, y, 2)
        if k2 <= 0:
            continue
        vertex = -k1 / (2 * k2)
        if not x.min() <= vertex <= x.max():
            continue                      # the minimum is outside the sizes tried: no estimate
        n = float(np.exp(vertex))
        out.append({"flops": c, "params": n, "tokens": c / (6 * n), "runs": len(g),
                    "parabola": [float(k2), float(k1), float(k0)]})
    if not out:
        return None
    res = {"budgets": out, "a": None, "b": None}
    if len(out) >= 2:
        a, k = np.polyfit(np.log([g["flops"] for g in out]), np.log([g["params"] for g in out]), 1)
        res.update(a=float(a), b=float(1 - a), coef=float(np.exp(k)))
    return res


def fit_runs(runs: list[dict], flops: float | None = None, bootstrap: int = 100, seed: int = 0,
             starts: int = 8) -> dict:
    if len(runs) < 5:
        raise ConfigError("runs.csv", f"need at least 5 runs to fit 5 parameters, got {len(runs)}")
    n = np.array([r["params"] for r in runs], float)
    d = np.array([r["tokens"] for r in runs], float)
    loss = np.array([r["loss"] for r in runs], float)
    theta = fit_parametric_theta(n, d, loss, starts=starts)
    fit = _named(theta)
    target = flops or 10 * max(r.get("flops") or 6 * r["params"] * r["tokens"] for r in runs)
    rng = np.random.default_rng(seed)
    samples, n_opts = [], []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(runs), len(runs))
        t = fit_parametric_theta(n[idx], d[idx], loss[idx], inits=[theta])
        s = _named(t)
        samples.append(s)
        n_opts.append(_optimal_params(s, target))
    ci = {}
    if samples:
        for k in fit:
            vals = np.array([s[k] for s in samples])
            ci[k] = [float(np.nanpercentile(vals, 2.5)), float(np.nanpercentile(vals, 97.5))]
    fit["ci"] = ci
    n_opt = _optimal_params(fit, target)
    allocation = {"flops": target, "params": n_opt, "tokens": target / (6 * n_opt),
                  "loss": fit["E"] + fit["A"] / n_opt ** fit["alpha"] + fit["B"] / (target / (6 * n_opt)) ** fit["beta"]}
    if n_opts:
        allocation["params_ci"] = [float(np.percentile(n_opts, 2.5)), float(np.percentile(n_opts, 97.5))]
    return {"runs": len(runs), "parametric": fit, "isoflop": isoflop(runs), "allocation": allocation,
            "method": "Hoffmann et al. 2022 App. D.2 (Huber 1e-3, L-BFGS, grid starts); Approach 2 parabolas"}
