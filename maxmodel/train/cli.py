"""`maxmodel train [CONFIG.yaml] [key.sub=value ...]`"""
from __future__ import annotations

import argparse
import sys

from maxmodel.config import load_config_args
from maxmodel.logs import setup_logging


def parse(argv: list[str]) -> list[str]:
    parser = argparse.ArgumentParser(prog="maxmodel train", description=__doc__)
    parser.add_argument("args", nargs="*", help="an optional CONFIG.yaml, then key.sub=value overrides")
    return parser.parse_args(argv).args


def main(argv: list[str]) -> int:
    cfg = load_config_args(parse(argv))
    setup_logging()
    from .guards import NonFiniteStop
    from .loop import Preempted, train
    try:
        result = train(cfg)
    except Preempted as e:
        print(f"maxmodel train: {e}", file=sys.stderr)
        return 3
    except NonFiniteStop as e:  # train.on_nonfinite=stop
        print(f"maxmodel train: {e}", file=sys.stderr)
        return 1
    import jax

    from .sample import end_of_run_sample
    if jax.process_index() == 0:
        report(cfg, result)
    sample = end_of_run_sample(cfg, result)  # every process: the forward is one program over all devices
    if sample is not None and jax.process_index() == 0:
        print(sample)
    return 0


def report(cfg, result) -> None:
    s = result.stats
    lines = [f"run directory: {result.run_dir}", f"steps: {result.start_step} -> {result.final_step}"]
    if result.losses:
        last = max(result.losses)
        lines.append(f"train loss at step {last}: {result.losses[last]:.4f}")
    if result.eval_loss is not None:
        lines.append(f"eval loss: {result.eval_loss:.4f}" + (f"   (unigram baseline: {s['unigram_eval_loss']:.4f})"
                                                             if "unigram_eval_loss" in s else ""))
    print("\n".join(lines))
