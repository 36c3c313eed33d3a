"""Meta-evaluation of a judge against human labels: exact agreement, Cohen's kappa (unweighted, or linear /
quadratic weights for ordinal scores) and Spearman's rank correlation (average ranks for ties). Items the
judge skipped (None) are left out and counted."""
from __future__ import annotations

import math

import numpy as np


def cohen_kappa(a, b, weights: str | None = None) -> float:
    """(p_o - p_e) / (1 - p_e) from the confusion matrix of two raters over the union of their labels;
    with weights, 1 - sum(w * observed) / sum(w * expected)."""
    try:
        labels = sorted(set(a) | set(b))
    except TypeError:  # mixed label types: any fixed order will do (unweighted kappa ignores it)
        labels = sorted(set(a) | set(b), key=str)
    index = {v: i for i, v in enumerate(labels)}
    k = len(labels)
    observed = np.zeros((k, k))
    for x, y in zip(a, b):
        observed[index[x], index[y]] += 1
    observed /= observed.sum()
    expected = np.outer(observed.sum(1), observed.sum(0))
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    if weights is None:
        w = (i != j).astype(float)
    elif weights in ("linear", "quadratic"):
        w = np.abs(i - j) ** (1.0 if weights == "linear" else 2.0)  # label order = the sorted labels
    else:
        raise ValueError(f"weights must be None, linear or quadratic, not {weights!r}")
    denom = (w * expected).sum()
    return float(1.0 - (w * observed).sum() / denom) if denom else float("nan")


def spearman(a, b) -> float:
    """Pearson correlation of the average ranks."""
    from scipy.stats import rankdata
    ra, rb = rankdata(np.asarray(a, float)), rankdata(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / denom) if denom else float("nan")


def meta_evaluate(judge, human, weights: str | None = None, ordinal: bool = True) -> dict:
    """Agreement, kappa and (for ordinal labels) Spearman of judge labels against human ones."""
    if len(judge) != len(human):
        raise ValueError(f"{len(judge)} judge labels for {len(human)} human labels")
    pairs = [(j, h) for j, h in zip(judge, human) if j is not None]
    out = {"n": len(pairs), "skipped": len(judge) - len(pairs)}
    if not pairs:
        return out | {"agreement": float("nan"), "kappa": float("nan")}
    js, hs = zip(*pairs)
    out["agreement"] = sum(j == h for j, h in pairs) / len(pairs)
    out["kappa"] = cohen_kappa(js, hs, weights)
    if ordinal:
        out["spearman"] = spearman(js, hs)
    return out
