"""Layered config loading: defaults < configs/base.yaml < configs/models/<model.name>.yaml < experiment file
< dotted `key=value` overrides. Every value is checked against the schema's type as it is applied."""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .schema import FIELD_TO_YAML, YAML_TO_FIELD, Config

CONFIGS_DIR = Path(os.environ.get("MAXMODEL_CONFIGS", Path(__file__).resolve().parents[2] / "configs"))


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_names(obj) -> list[str]:
    """The YAML key names of a section."""
    return [FIELD_TO_YAML.get(fld.name, fld.name) for fld in dataclasses.fields(obj)]


def _closest(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(candidates))}"


def _coerce(value: Any, typ: Any, key: str, from_text: bool) -> Any:
    """Convert `value` to the schema type `typ`, or raise ConfigError naming the key."""
    origin = typing.get_origin(typ)
    if typ is Any:
        return yaml.safe_load(value) if from_text else value
    if origin is dict or typ is dict:
        value = yaml.safe_load(value) if from_text else value
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(key, f"expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(key, f"expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return int(number)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected a number, got {value!r}")
        try:
            return float(str(value).replace("_", "")) if not isinstance(value, (int, float)) else float(value)
        except ValueError:
            raise ConfigError(key, f"expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return "" if value is None else str(value)
    raise ConfigError(key, f"unsupported schema type {typ}")


def _resolve(obj, dotted: str) -> tuple[Any, str, Any]:
    """Walk `a.b.c` to (the dataclass holding c, c's field name, c's type)."""
    parts = dotted.split(".")
    node = obj
    for i, part in enumerate(parts):
        names = _field_names(node)
        if part not in names:
            prefix = ".".join(parts[:i])
            full = [f"{prefix}.{n}" if prefix else n for n in names]
            raise ConfigError(dotted, "unknown key" + _closest(dotted, full))
        name = YAML_TO_FIELD.get(part, part)
        typ = _hints(type(node))[name]
        if i == len(parts) - 1:
            return node, name, typ
        child = getattr(node, name)
        if not dataclasses.is_dataclass(child):
            raise ConfigError(dotted, f"'{'.'.join(parts[:i + 1])}' is a value, not a section")
        node = child
    raise AssertionError("unreachable")


def _set_mapping_entry(cfg: Config, dotted: str, value: Any, from_text: bool) -> bool:
    """`a.mapping.key=value` for a mapping-typed field (mesh.rule_overrides.layers=stage): set one entry and
    keep the others. False when the parent of `dotted` is not such a field."""
    parent, _, entry = dotted.rpartition(".")
    try:
        node, name, typ = _resolve(cfg, parent) if parent else (None, None, None)
    except ConfigError:
        return False
    if node is None or not (typing.get_origin(typ) is dict or typ is dict):
        return False
    setattr(node, name, {**getattr(node, name), entry: yaml.safe_load(value) if from_text else value})
    return True


def set_value(cfg: Config, dotted: str, value: Any, from_text: bool = False) -> None:
    if _set_mapping_entry(cfg, dotted, value, from_text):
        return
    node, name, typ = _resolve(cfg, dotted)
    if dataclasses.is_dataclass(getattr(node, name)):
        if from_text:
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(dotted, f"is a section; expected a mapping, got {value!r}")
        apply_mapping(cfg, value, prefix=dotted)
        return
    setattr(node, name, _coerce(value, typ, dotted, from_text))


def apply_mapping(cfg: Config, mapping: dict, prefix: str = "", source: str = "") -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(prefix, f"expected a mapping{f' in {source}' if source else ''}, got {mapping!r}")
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        try:
            node, name, _ = _resolve(cfg, dotted)
        except ConfigError as e:
            raise ConfigError(e.key, f"{str(e).split(': ', 1)[1]}{f' (in {source})' if source else ''}") from None
        if dataclasses.is_dataclass(getattr(node, name)) and isinstance(value, dict):
            apply_mapping(cfg, value, dotted, source)
        else:
            set_value(cfg, dotted, value)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("", f"cannot parse {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a mapping of sections at the top level")
    return data


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    out = []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(arg, "overrides are written key.sub=value")
        key, value = arg.split("=", 1)
        out.append((key.strip(), value))
    return out


def model_file(name: str) -> Path:
    return CONFIGS_DIR / "models" / f"{name}.yaml"


def load_config(config_file: str | Path | None = None, overrides: list[str] | tuple = (),
                derive: bool = True) -> Config:
    """Resolve a config from its layers; raise ConfigError naming the key at fault."""
    from .derive import derive_values
    from .validate import validate

    pairs = parse_overrides(list(overrides))
    experiment = read_yaml(config_file) if config_file else {}
    base = read_yaml(CONFIGS_DIR / "base.yaml") if (CONFIGS_DIR / "base.yaml").is_file() else {}

    # model.name picks the model file; the experiment file and overrides may set it.
    name = (base.get("model") or {}).get("name", Config().model.name)
    name = (experiment.get("model") or {}).get("name", name)
    for key, value in pairs:
        if key == "model.name":
            name = value
    cfg = Config()
    apply_mapping(cfg, base, source=str(CONFIGS_DIR / "base.yaml"))
    path = model_file(name)
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIGS_DIR / "models").glob("*.yaml"))
        raise ConfigError("model.name", f"no model config '{name}'" + _closest(name, known))
    apply_mapping(cfg, read_yaml(path), source=str(path))
    apply_mapping(cfg, experiment, source=str(config_file))
    for key, value in pairs:
        set_value(cfg, key, value, from_text=True)
    if derive:
        derive_values(cfg)
    validate(cfg)
    return cfg


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """The CLI form shared by every command: an optional CONFIG.yaml first, then key.sub=value overrides."""
    args = list(args)
    config_file = args[0] if args and "=" not in args[0] else None
    return config_file, args[1:] if config_file else args


def load_config_args(args: list[str]) -> Config:
    return load_config(*split_config_args(args))


def config_from_dict(data: dict) -> Config:
    """A resolved config saved in a run directory or checkpoint, read back."""
    from .validate import validate
    cfg = Config()
    apply_mapping(cfg, data)
    validate(cfg)
    return cfg
