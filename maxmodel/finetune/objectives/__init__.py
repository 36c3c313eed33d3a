"""Training objectives behind one interface (base.Objective): each is one module here whose `OBJECTIVE` names
its extra batch keys, the architectures it trains and its loss. A new objective is a new file; `train.objective`
is its module name. The jitted step (train/step.py) calls `Objective.loss` and knows nothing else about it."""
from __future__ import annotations

import importlib
import pkgutil

from .base import BATCH_KEYS, PROMPT_KEYS, LossSettings, Objective, token_logps


def names() -> tuple[str, ...]:
    """Every objective: the modules of this package (found without importing them)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"))


def get(name: str) -> Objective:
    if name not in names():
        raise KeyError(name)
    return importlib.import_module(f"{__name__}.{name}").OBJECTIVE


__all__ = ["BATCH_KEYS", "PROMPT_KEYS", "LossSettings", "Objective", "get", "names", "token_logps"]
