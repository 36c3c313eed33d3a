"""Runs to fit: a CSV (params, tokens, loss[, flops]) or finished maxmodel run directories."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from maxmodel.config.errors import ConfigError

REQUIRED = ("params", "tokens", "loss")


def _positive_number(text, where: str, column: str) -> float:
    try:
        value = float(str(text).replace("_", ""))
    except ValueError:
        raise ConfigError(where, f"column '{column}': not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(where, f"column '{column}': must be a positive number, got {text!r}")
    return value


def read_csv(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "runs file not found")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip().lower() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise ConfigError(str(path), f"missing column{'s' if len(missing) > 1 else ''} "
                                         f"{', '.join(repr(c) for c in missing)} (has: {', '.join(columns) or 'none'})")
        runs = []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip().lower(): v for k, v in row.items()}
            where = f"{path}:{line}"
            run = {c: _positive_number(row[c], where, c) for c in REQUIRED}
            if "flops" in columns and (row.get("flops") or "").strip():
                run["flops"] = _positive_number(row["flops"], where, "flops")
            runs.append(run)
    if not runs:
        raise ConfigError(str(path), "no runs in file")
    return runs


def read_run_dir(path: str | Path) -> dict:
    """params from the resolved config's shape, tokens = last step × batch × seq_len, loss = the last
    eval_loss logged (else the last training loss)."""
    import yaml

    from maxmodel.config.derive import derive_values
    from maxmodel.config.loader import apply_mapping
    from maxmodel.config.schema import Config
    from maxmodel.config.validate import validate

    from .shape import count_params

    path = Path(path)
    cfg_file, metrics_file = path / "config.yaml", path / "metrics.jsonl"
    for f in (cfg_file, metrics_file):
        if not f.is_file():
            raise ConfigError(str(path), f"not a finished run directory: {f.name} is missing")
    # Built here rather than with config.config_from_dict, which (at this commit) calls an unimported validate.
    cfg = Config()
    apply_mapping(cfg, yaml.safe_load(cfg_file.read_text()) or {}, source=str(cfg_file))
    validate(derive_values(cfg))
    last, eval_loss, train_loss = None, None, None
    for n, line in enumerate(metrics_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{metrics_file}:{n}", "not a JSON object") from None
        if "step" in rec:
            last = rec if last is None or rec["step"] >= last["step"] else last
        if "eval_loss" in rec:
            eval_loss = rec["eval_loss"]
        if "loss" in rec:
            train_loss = rec["loss"]
    loss = eval_loss if eval_loss is not None else train_loss
    if last is None or loss is None:
        raise ConfigError(str(metrics_file), "no logged step with a loss")
    tokens = last.get("tokens") or last["step"] * cfg.train.batch_size * cfg.train.seq_len
    params = count_params(cfg.model)["total"]
    return {"params": float(params), "tokens": float(tokens), "loss": float(loss),
            "flops": 6.0 * params * tokens, "run": str(path)}


def read_run_dirs(paths: list[str]) -> list[dict]:
    return [read_run_dir(p) for p in paths]
