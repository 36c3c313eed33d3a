"""`maxmodel config show [CONFIG.yaml] [key=value ...] [--json]`: the resolved config and parameter counts."""
from __future__ import annotations

import argparse

import yaml

from maxmodel import jsonio

from maxmodel.config.loader import load_config_args
from maxmodel.config.schema import to_dict


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="maxmodel config")
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print the resolved config and parameter counts")
    show.add_argument("args", nargs="*", help="an optional CONFIG.yaml, then key.sub=value overrides")
    show.add_argument("--json", action="store_true", help="one JSON object instead of YAML")
    ns = parser.parse_args(argv)
    args = ns.args
    cfg = load_config_args(args)

    from maxmodel.models.params import count_params
    out = to_dict(cfg)
    out["params"] = count_params(cfg)
    if cfg.peft.method != "none" or cfg.train.qat != "none":  # what trains, and the bytes it holds
        from .state_bytes import report_for
        out["state"] = report_for(cfg)
    if ns.json:
        print(jsonio.dumps(out, indent=2))
    else:
        print(yaml.safe_dump(out, sort_keys=False), end="")
    return 0
