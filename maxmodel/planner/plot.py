"""IsoFLOP curves and the fitted compute-optimal frontier, as a PNG (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path


def plot_fit(runs: list[dict], result: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    iso = result.get("isoflop") or {"budgets": []}
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(iso["budgets"]))))
    left.scatter([r["params"] for r in runs], [r["loss"] for r in runs], s=10, color="0.6", label="runs")
    for color, g in zip(colors, iso["budgets"]):
        xs = np.linspace(np.log(g["params"]) - 2, np.log(g["params"]) + 2, 100)
        left.plot(np.exp(xs), np.polyval(g["parabola"], xs), color=color, label=f"C={g['flops']:.1e}")
        left.axvline(g["params"], color=color, ls=":", lw=0.8)
    left.set(xscale="log", xlabel="parameters N", ylabel="loss", title="IsoFLOP profiles")
    left.legend(fontsize=7)
    pf = result["parametric"]
    budgets = [g["flops"] for g in iso["budgets"]] or [6 * r["params"] * r["tokens"] for r in runs]
    cs = np.logspace(np.log10(min(budgets)) - 1, np.log10(result["allocation"]["flops"]) + 1, 50)
    g_coef = (pf["alpha"] * pf["A"] / (pf["beta"] * pf["B"])) ** (1 / (pf["alpha"] + pf["beta"]))
    right.plot(cs, g_coef * (cs / 6) ** pf["a"], label=f"parametric fit: N ∝ C^{pf['a']:.3f}")
    if iso["budgets"]:
        right.scatter([g["flops"] for g in iso["budgets"]], [g["params"] for g in iso["budgets"]], color="C1",
                      label="IsoFLOP minima" + (f" (a={iso['a']:.3f})" if iso.get("a") else ""))
    al = result["allocation"]
    right.scatter([al["flops"]], [al["params"]], marker="*", s=120, color="C3", label="planned budget")
    right.set(xscale="log", yscale="log", xlabel="FLOPs C", ylabel="optimal N", title="Compute-optimal frontier")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
