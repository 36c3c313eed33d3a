"""User code named in configs (reward functions, metrics, recipe calls): imported by dotted path."""
from __future__ import annotations

import importlib
from collections.abc import Callable

from maxmodel.config.errors import ConfigError


def import_callable(path: str, key: str, what: str = "function") -> Callable:
    """`package.module.name` or `package.module:name`, imported; a ConfigError naming `key` says why not."""
    module, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not sep or not module or not attr:
        raise ConfigError(key, f"{path!r} is not a dotted path to a {what} (package.module.{what})")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(key, f"cannot import {what} {path!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(key, f"{what} {path!r} is not callable")
    return fn
