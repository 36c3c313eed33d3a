"""`maxmodel plot RUN_DIR [RUN_DIR ...] --out curves.png`: loss, eval loss, learning rate and throughput
against step, from each run's metrics.jsonl, the runs overlaid (one colour per run)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from maxmodel.config import ConfigError

PANELS = (("loss", "train loss"), ("eval_loss", "eval loss"), ("lr", "learning rate"),
          ("tokens_per_sec", "tokens/s"))


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError("RUN_DIR", f"{run_dir} has no metrics.jsonl (is it a maxmodel run directory?)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError("RUN_DIR", f"{path}:{n} is not JSON ({e.msg})") from None
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a resumed run's repeated steps keep their latest value."""
    points = {r["step"]: r[key] for r in records if key in r and r[key] is not None}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on training hosts
    import matplotlib.pyplot as plt

    runs = [(d.name or str(d), read_metrics(d)) for d in run_dirs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, (key, title) in zip(axes.flat, PANELS):
        for name, records in runs:
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 3 else None, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes.flat[0].legend(fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="maxmodel plot", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with a metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG file to write")
    args = parser.parse_args(argv)
    print(plot_runs(args.runs, args.out))
    return 0
