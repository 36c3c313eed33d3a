"""The experiment config a plan trains with: keys of maxmodel/config/schema.py, loadable by load_config."""
from __future__ import annotations

import math
from pathlib import Path

from . import hparams


def build_config(shape, *, tokens: float, flops: float, batch: int, seq_len: int, layout: dict | None,
                 param_dtype: str = "float32", optimizer: str = "adamw") -> dict:
    steps = max(1, math.ceil(tokens / (batch * seq_len)))
    mesh = dict(layout["mesh"]) if layout else {"data": -1, "fsdp": 1, "tensor": 1, "stage": 1}
    micro = layout["microbatches"] if layout else 1
    extra = {}
    if mesh.get("stage", 1) > 1:
        # A pipelined layout: its microbatches flow through the stages (at least one per stage).
        mesh["rules"] = "pipeline"
        extra["pipeline"] = {"microbatches": max(micro, mesh["stage"])}
        micro = 1
    return {
        "model": {**shape.as_model(), "norm": "rmsnorm", "positional": "rope", "max_seq_len": seq_len},
        "mesh": mesh,
        **extra,
        "train": {"steps": steps, "batch_size": batch, "seq_len": seq_len,
                  "microbatches": micro,
                  "dtype": "bfloat16", "param_dtype": param_dtype,
                  "remat": layout["remat"] if layout else "none"},
        "optimizer": {"name": optimizer, "lr": float(f"{hparams.learning_rate(flops):.3g}"), "schedule": "cosine",
                      "warmup_steps": hparams.warmup_steps(steps), "min_lr_ratio": 0.1, "weight_decay": 0.1,
                      "b1": 0.9, "b2": 0.95, "clip_norm": 1.0},
        "checkpoint": {"every_steps": max(1, min(1000, steps // 10))},
        "run": {"name": f"plan-{shape.params['total'] / 1e6:.0f}m"},
    }


def write_config(path: str | Path, config: dict, header: str = "") -> Path:
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + text)
    return path
