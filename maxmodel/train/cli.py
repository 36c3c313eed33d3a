"""`maxmodel train [CONFIG.yaml] [key.sub=value ...]`"""
from __future__ import annotations

import argparse
import logging
import sys

from maxmodel.config import load_config_args


def parse(argv: list[str]) -> list[str]:
    parser = argparse.ArgumentParser(prog="maxmodel train", description=__doc__)
    parser.add_argument("args", nargs="*", help="an optional CONFIG.yaml, then key.sub=value overrides")
    return parser.parse_args(argv).args


def setup_logging() -> None:
    """maxmodel's own messages at INFO; the libraries' routine chatter (absl/orbax, jax backends) hidden."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("absl", "jax._src.xla_bridge", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


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
    if jax.process_index() == 0:
        report(cfg, result)
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
    if cfg.model.arch == "encoder":  # an encoder fills in masks; it has no left-to-right continuation
        return
    if result.tokenizer is not None and cfg.run.sample_tokens > 0 and result.final_step > result.start_step:
        import jax
        from flax import nnx

        from maxmodel.parallel.rules import mesh_rules

        from .sample import greedy_continue, greedy_translate
        rows = result.mesh.shape["data"] * result.mesh.shape["fsdp"] * result.mesh.shape["expert"]
        tok = result.tokenizer
        with jax.set_mesh(result.mesh), nnx.logical_axis_rules(mesh_rules(cfg.mesh, result.mesh)):
            if cfg.train.objective == "seq2seq":  # the prompt is the source; the decoder writes its target
                out = greedy_translate(result.graphdef, result.params, tok.encode(cfg.run.sample_prompt),
                                       tok.bos_id, tok.eos_id, cfg.run.sample_tokens, cfg.train.seq_len, rows)
                print(f"sample (greedy seq2seq): {cfg.run.sample_prompt!r} -> {tok.decode(out)!r}")
                return
            prompt = [tok.bos_id] + tok.encode(cfg.run.sample_prompt)
            out = greedy_continue(result.graphdef, result.params, prompt, cfg.run.sample_tokens,
                                  cfg.train.seq_len, rows, prefix_lm=cfg.train.objective == "prefix_lm")
        print(f"sample (greedy): {cfg.run.sample_prompt}{tok.decode(out)}")
