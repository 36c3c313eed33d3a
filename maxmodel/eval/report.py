"""`maxmodel eval report RUN_OR_RESULTS... --out eval.png [--metrics acc,bits_per_byte] [--json]`

Each input is a results JSON (`maxmodel eval --output`) or a run directory (its metrics.jsonl, where
run.eval_tasks logged `eval/<task>/<metric>`). The figure has a bar chart of task metrics × models /
checkpoints (results files, and each run's last evaluation) and, for run directories, each metric against the
training step. `--json` prints the table it drew.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from maxmodel.config import ConfigError

PREFERRED = ("acc", "acc_norm", "exact_match", "f1", "bleu", "rougeL", "bits_per_byte", "word_perplexity",
             "token_perplexity")


def _label(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def read_input(path: Path) -> tuple[dict[str, float], dict[str, list[tuple[int, float]]]]:
    """({"task/metric": value} for the bars, {"task/metric": [(step, value)]} for the curves)."""
    from .runner import flat_metrics
    if path.is_file():
        try:
            return flat_metrics(json.loads(path.read_text())), {}
        except (json.JSONDecodeError, AttributeError) as e:
            raise ConfigError("RUN_OR_RESULTS", f"{path}: not a results JSON ({e})") from None
    metrics_file = path / "metrics.jsonl"
    if not metrics_file.is_file():
        raise ConfigError("RUN_OR_RESULTS", f"{path} is neither a results JSON nor a run directory (no metrics.jsonl)")
    curves: dict[str, list[tuple[int, float]]] = {}
    for line_no, line in enumerate(metrics_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError("RUN_OR_RESULTS", f"{metrics_file}:{line_no}: malformed JSON") from None
        for key, value in record.items():
            if key.startswith("eval/") and isinstance(value, (int, float)):
                curves.setdefault(key[len("eval/"):], []).append((int(record["step"]), float(value)))
    return {k: v[-1][1] for k, v in curves.items()}, curves


def _chosen(keys, wanted: list[str] | None) -> list[str]:
    """Per task, the wanted metrics (default: the first of PREFERRED it has)."""
    by_task: dict[str, list[str]] = {}
    for key in keys:
        task, _, metric = key.rpartition("/")
        by_task.setdefault(task, []).append(metric)
    out = []
    for task, metrics in sorted(by_task.items()):
        pick = [m for m in metrics if m in wanted] if wanted else next(([m] for m in PREFERRED if m in metrics),
                                                                       sorted(metrics)[:1])
        out += [f"{task}/{m}" for m in pick]
    return out


def draw(inputs: list[Path], out: Path, wanted: list[str] | None = None) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    read = {_label(p): read_input(p) for p in inputs}
    keys = _chosen({k for bars, _ in read.values() for k in bars}, wanted)
    if not keys:
        raise ConfigError("RUN_OR_RESULTS", "no evaluation metrics in " + ", ".join(map(str, inputs)))
    curve_keys = [k for k in keys if any(k in c for _, c in read.values())]
    fig, axes = plt.subplots(1, 1 + bool(curve_keys), figsize=(6 + 5 * bool(curve_keys), 4.5), squeeze=False)
    ax = axes[0, 0]
    width = 0.8 / len(read)
    for i, (label, (bars, _)) in enumerate(read.items()):
        ax.bar(np.arange(len(keys)) + i * width, [bars.get(k, np.nan) for k in keys], width, label=label)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys, rotation=30, ha="right", fontsize=8)
    ax.set_title("tasks × models")
    ax.legend(fontsize=8)
    if curve_keys:
        ax = axes[0, 1]
        for label, (_, curves) in read.items():
            for k in curve_keys:
                if k in curves:
                    steps, values = zip(*curves[k])
                    ax.plot(steps, values, marker="o", label=f"{label}: {k}")
        ax.set_xlabel("step")
        ax.set_title("metric vs step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {label: {k: bars.get(k) for k in keys} for label, (bars, _) in read.items()}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="maxmodel eval report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="results JSON files and/or run directories")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--metrics", default=None, help="comma-separated metric names (default: one per task)")
    p.add_argument("--json", action="store_true", help="also print the table drawn as JSON")
    args = p.parse_args(argv)
    for path in args.inputs:
        if not Path(path).exists():
            raise ConfigError("RUN_OR_RESULTS", f"{path} does not exist")
    table = draw([Path(x) for x in args.inputs], Path(args.out),
                 args.metrics.split(",") if args.metrics else None)
    print(json.dumps(table, indent=1) if args.json else f"wrote {args.out}")
    return 0
