"""`maxmodel plan ...` and `maxmodel plan fit ...`.

  maxmodel plan --flops 5.76e23
  maxmodel plan --chip v5p --chips 256 --days 30 --mfu 0.45 --price-per-chip-hour 4.2 --write-config exp.yaml
  maxmodel plan --params 7B --inference-tokens 2T --json
  maxmodel plan fit runs.csv --plot isoflop.png
  maxmodel plan fit --from-runs runs/*
"""
from __future__ import annotations

import argparse
import math
import re
import sys

from maxmodel import jsonio
from maxmodel.config.errors import ConfigError

SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


def number(text: str) -> float:
    """1e21, 5.76e+23, 70B, 1.4T, 1_000."""
    m = re.fullmatch(r"\s*([-+]?[0-9_.]+(?:e[-+]?\d+)?)\s*([kmbgtp]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a number: '{text}'")
    try:
        value = float(m.group(1).replace("_", "")) * SUFFIX[m.group(2)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: '{text}'")
    return value


def integer(text: str) -> int:
    value = number(text)
    if not float(value).is_integer():
        raise argparse.ArgumentTypeError(f"not an integer: '{text}'")
    return int(value)


class Parser(argparse.ArgumentParser):
    """Usage errors become ConfigError (exit 2, message naming the flag) instead of a bare SystemExit."""

    def error(self, message):
        flag = re.search(r"argument (--?[\w-]+)", message)
        raise ConfigError(flag.group(1) if flag else "", f"{self.prog}: {message}")


def plan_parser() -> Parser:
    from .laws import LAWS

    p = Parser(prog="maxmodel plan", description="Plan model size, data, layout, time and cost for a budget.")
    g = p.add_argument_group("budget")
    g.add_argument("--flops", type=number, help="training compute budget in FLOPs")
    g.add_argument("--chip", help="v4, v5e, v5p, v6e, a100-80gb, h100, h200, b200")
    g.add_argument("--chips", type=integer, help="number of chips")
    g.add_argument("--days", type=number, help="days of training on --chips")
    g.add_argument("--mfu", type=number, default=0.4, help="model FLOPs utilisation (default 0.4)")
    g.add_argument("--params", type=number, help="fix the parameter count (solve for tokens)")
    g.add_argument("--tokens", type=number, help="fix the training tokens (solve for parameters)")
    g.add_argument("--deadline-days", type=number, help="with --chip and no --chips: chips needed to finish")
    g.add_argument("--price-per-chip-hour", type=number, help="price in dollars: adds the cost")
    g = p.add_argument_group("law")
    g.add_argument("--law", default=None, choices=list(LAWS),
                   help="scaling law (default chinchilla-3; muennighoff with --unique-tokens)")
    g.add_argument("--unique-tokens", type=number,
                   help="unique tokens available: the data-constrained law (Muennighoff et al. 2023) on the "
                        "chosen base law; its own jointly fitted base unless --law is given")
    g.add_argument("--inference-tokens", type=number, help="tokens the model will serve (inference-aware)")
    g = p.add_argument_group("shape and training")
    g.add_argument("--vocab", type=integer, default=32000)
    g.add_argument("--seq-len", type=integer, default=4096)
    g.add_argument("--activation", default="swiglu", choices=["swiglu", "geglu", "gelu", "relu"])
    g.add_argument("--tensor", type=integer, default=1, help="heads must divide by this tensor-parallel degree")
    g.add_argument("--tie-embeddings", action="store_true")
    g.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "lion", "sgd", "adafactor"])
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--write-config", metavar="OUT.yaml", help="write the experiment config")
    g.add_argument("--compile", action="store_true", help="AOT-compile the train step for the TPU topology")
    g.add_argument("--topology", help="TPU topology for --compile, e.g. v5p:4x4x8 (default: from --chips)")
    g.add_argument("--slices", type=integer, default=1)
    return p


def fit_parser() -> Parser:
    p = Parser(prog="maxmodel plan fit", description="Fit L(N, D) to your own runs.")
    p.add_argument("csv", nargs="?", help="CSV with columns params, tokens, loss (optionally flops)")
    p.add_argument("--from-runs", nargs="+", metavar="DIR", help="finished maxmodel run directories")
    p.add_argument("--flops", type=number, help="budget for the optimal allocation (default 10x the largest run)")
    p.add_argument("--bootstrap", type=integer, default=100, help="bootstrap resamples for the intervals")
    p.add_argument("--seed", type=integer, default=0)
    p.add_argument("--plot", metavar="OUT.png", help="draw IsoFLOP curves and the fitted frontier")
    p.add_argument("--json", action="store_true")
    return p


def run_plan(argv: list[str]) -> int:
    from .plan import PlanRequest, make_plan

    args = plan_parser().parse_args(argv)
    req = PlanRequest(flops=args.flops, chip=args.chip, chips=args.chips, days=args.days, mfu=args.mfu,
                      params=args.params, tokens=args.tokens, law=args.law, unique_tokens=args.unique_tokens,
                      inference_tokens=args.inference_tokens, vocab=args.vocab, seq_len=args.seq_len,
                      activation=args.activation, tensor=args.tensor, tie_embeddings=args.tie_embeddings,
                      price_per_chip_hour=args.price_per_chip_hour, deadline_days=args.deadline_days,
                      param_dtype=args.param_dtype, optimizer=args.optimizer)
    if args.compile and not args.chip:
        raise ConfigError("--compile", "needs --chip (a TPU) and --chips")
    plan = make_plan(req)
    if args.write_config:
        from .emit import write_config

        write_config(args.write_config, plan["config"],
                     header=f"Written by `maxmodel plan {' '.join(argv)}`.\nSet data.source / data.path "
                            f"and a tokenizer with vocab_size {plan['config']['model']['vocab_size']}.")
        plan["config_path"] = args.write_config
    if args.compile:
        plan["compile"] = run_compile(plan, args)
    if args.json:
        print(jsonio.dumps(plan))
    else:
        sys.stdout.write(_plain(plan))
    return 0


def _plain(plan: dict) -> str:
    from .report import plan_table

    text = plan_table(plan)
    if plan.get("config_path"):
        text += f"\nwrote {plan['config_path']}\n"
    if plan.get("compile"):
        text += _compile_line(plan["compile"])
    return text


def _compile_line(compiled: dict) -> str:
    from .config_memory import TOLERANCE
    r, GiB = compiled["result"], 1024 ** 3
    if "needed_bytes" not in r:
        return f"compiled for {compiled['topology']}: {r.get('error', r)}\n"
    text = (f"compiled for {compiled['topology']}: needs {r['needed_bytes'] / GiB:.2f} GiB per chip"
            f"{'' if r['fits'] else ' and does NOT fit'}")
    if e := r.get("estimate"):
        text += (f"; the plan's estimate {e['estimate_bytes'] / GiB:.2f} GiB is {e['ratio']:.2f} × that "
                 f"({'within' if e['within_tolerance'] else 'OUTSIDE'} ±{TOLERANCE:.0%})")
    return text + "\n"


def run_compile(plan: dict, args) -> dict:
    """Validate the chosen layout by compiling the real train step for the TPU topology ahead of time."""
    from .hardware import default_topology, get_chip

    try:
        from maxmodel.train.aot import DoesNotFit, compile_for_topology
    except ImportError:
        raise ConfigError("--compile", "AOT compile is not available yet (maxmodel.train.aot."
                                       "compile_for_topology is missing from this install)") from None
    import tempfile

    from maxmodel.config import load_config

    chip = get_chip(args.chip)
    default_topology(chip, plan["chips"] or 1)  # validates: a TPU chip, a power-of-two slice
    # The TPU type as gcloud names it (v4 and v5p count TensorCores, two per chip), as `maxmodel compile` takes.
    cores = 2 if chip.name in ("v4", "v5p") else 1
    topology = args.topology or f"{chip.name}-{(plan['chips'] or 1) * cores}"
    path = args.write_config
    if not path:
        from .emit import write_config

        path = write_config(tempfile.mkdtemp() + "/plan.yaml", plan["config"])
    cfg = load_config(path)
    from .config_memory import estimate
    try:
        report = compile_for_topology(cfg, topology, args.slices)
        result = {**report.as_dict(), "estimate": estimate(cfg, report.needed_bytes, report.mesh)}
    except DoesNotFit as e:  # the TPU compiler's own verdict: report it rather than fail the plan
        result = {"fits": False, "error": str(e)}
        if e.used_bytes:
            result.update(needed_bytes=e.used_bytes, estimate=estimate(cfg, e.used_bytes, e.mesh))
    return {"topology": topology, "slices": args.slices, "result": result}


def run_fit(argv: list[str]) -> int:
    from .fit import fit_runs
    from .report import fit_table
    from .runs import read_csv, read_run_dirs

    args = fit_parser().parse_args(argv)
    if bool(args.csv) == bool(args.from_runs):
        raise ConfigError("runs.csv", "give either a CSV file or --from-runs DIR ...")
    runs = read_csv(args.csv) if args.csv else read_run_dirs(args.from_runs)
    result = fit_runs(runs, flops=args.flops, bootstrap=args.bootstrap, seed=args.seed)
    if args.plot:
        from .plot import plot_fit

        result["plot"] = str(plot_fit(runs, result, args.plot))
    print(jsonio.dumps(result) if args.json else fit_table(result), end="" if not args.json else "\n")
    return 0


def main(argv: list[str]) -> int:
    argv = list(argv)
    if argv and argv[0] == "fit":
        return run_fit(argv[1:])
    return run_plan(argv)
