"""Named datasets and their mixture weights.

`data.source=mixture` with `data.mixture: {name: {source, path, weight, text_field, format, eval_path}}`
(source and path required; the rest default to the top-level `data.*` keys, weight to 1). Any other
`data.source` is a mixture of one component built from the top-level `data.*` keys. Rows are drawn by
grain's `MapDataset.mix`, a deterministic interleave by weight, so the realised proportions are exact
functions of the weights and can be reported before training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grain

from maxmodel.config.errors import ConfigError
from maxmodel.config.schema import Config

from .supervised import FORMATS

COMPONENT_SOURCES = ("builtin", "jsonl", "text", "parquet", "arrayrecord")
COMPONENT_KEYS = ("source", "path", "weight", "text_field", "format", "eval_path", "task")


@dataclass
class Component:
    name: str
    key: str            # the config key that describes it, for error messages
    source: str
    path: Any
    weight: float
    text_field: str
    format: str
    eval_path: Any
    task: int = 0       # the soft-prompt table its documents use (peft.method=prompt, peft.num_prompts tables)


def components(cfg: Config) -> list[Component]:
    d = cfg.data
    if d.source != "mixture":
        return [Component(d.source, "data", d.source, d.path, 1.0, d.text_field, d.format, d.eval_path)]
    if not d.mixture:
        raise ConfigError("data.mixture", "data.source=mixture needs data.mixture: {name: {source, path, weight}}")
    out = []
    for name, spec in d.mixture.items():
        key = f"data.mixture.{name}"
        if not isinstance(spec, dict):
            raise ConfigError(key, f"expected a mapping with source, path and weight, got {spec!r}")
        unknown = sorted(set(spec) - set(COMPONENT_KEYS))
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", f"unknown key; valid keys: {', '.join(COMPONENT_KEYS)}")
        source = spec.get("source")
        if source not in COMPONENT_SOURCES:
            raise ConfigError(f"{key}.source", f"{source!r} is not one of {', '.join(COMPONENT_SOURCES)}")
        if source != "builtin" and not spec.get("path"):
            raise ConfigError(f"{key}.path", "missing: a file, glob or list (or a prepared directory)")
        try:
            weight = float(spec.get("weight", 1.0))
        except (TypeError, ValueError):
            raise ConfigError(f"{key}.weight", f"expected a number, got {spec.get('weight')!r}") from None
        if not weight > 0:
            raise ConfigError(f"{key}.weight", f"must be > 0, got {weight}")
        fmt = spec.get("format", d.format)
        if fmt not in FORMATS:
            raise ConfigError(f"{key}.format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
        task = spec.get("task", 0)
        if not isinstance(task, int) or isinstance(task, bool) or not 0 <= task < cfg.peft.num_prompts:
            raise ConfigError(f"{key}.task", f"a soft-prompt table index in [0, peft.num_prompts="
                                             f"{cfg.peft.num_prompts}), got {task!r}")
        if task and cfg.peft.method != "prompt":
            raise ConfigError(f"{key}.task", f"picks a soft prompt, but peft.method={cfg.peft.method}")
        out.append(Component(str(name), key, source, spec.get("path"), weight,
                             spec.get("text_field", d.text_field), fmt, spec.get("eval_path"), task))
    return out


def realised_proportions(comps: list[Component], rows: int, cap: int = 100_000) -> dict[str, float]:
    """Share of each component among the first `rows` global rows (at most `cap` counted), computed with
    the same grain mix over placeholders, so no document is read."""
    parts = [grain.MapDataset.range(1).repeat(None).map(lambda _, k=k: k) for k in range(len(comps))]
    mixed = grain.MapDataset.mix(parts, [c.weight for c in comps])
    n = max(1, min(rows, cap))
    counts = [0] * len(comps)
    for i in range(n):
        counts[mixed[i]] += 1
    return {c.name: round(counts[k] / n, 4) for k, c in enumerate(comps)}
