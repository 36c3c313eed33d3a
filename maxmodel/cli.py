"""`maxmodel <command> ...`: each command lives in its own module with a `main(argv) -> int`.

Exit codes (DESIGN.md): 0 success; 2 bad usage or config (the message names the key); 3 preempted after a
clean checkpoint; 1 anything else.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("maxmodel.train.cli", "train a model (pretraining)"),
    "export": ("maxmodel.train.export", "write a checkpoint's parameters alone (optionally bf16) for reuse"),
    "config": ("maxmodel.train.config_cli", "show the resolved config and parameter counts"),
    "plan": ("maxmodel.planner.cli", "plan model size, data, layout, time and cost for a compute budget"),
    "launch": ("maxmodel.launch.cli", "launch a job: local processes, TPU VMs, GKE, Slurm"),
    "shardings": ("maxmodel.train.shardings_cli", "per-parameter shardings and per-device memory"),
    "compile": ("maxmodel.train.compile_cli", "ahead-of-time compile the train step for a TPU topology"),
    "data": ("maxmodel.data.cli", "prepare data: tokenize sources into ArrayRecord shards"),
    "tokenizer": ("maxmodel.data.tokenizer_cli", "train a sentencepiece tokenizer; encode/decode text"),
    "convert": ("maxmodel.interop.cli", "convert Hugging Face checkpoints to and from maxmodel (from-hf, to-hf)"),
    "generate": ("maxmodel.inference.generate_cli", "generate text with a trained or converted model (KV cache, "
                                                    "continuous batching, sampling, beams, speculation)"),
    "bench": ("maxmodel.bench", "time the train step of a config: tokens/s, step time, compile, MFU, memory"),
    "plot": ("maxmodel.train.plot", "draw loss/eval/LR/throughput curves of one or more runs to a PNG"),
    "serve": ("maxmodel.inference.serve_cli", "serve a model over an OpenAI-compatible HTTP API"),
    "recipe": ("maxmodel.finetune.recipe", "run a multi-stage post-training recipe (e.g. sft -> grpo -> "
                                           "rejection sampling -> sft), resumable at any stage"),
    "synthesize": ("maxmodel.finetune.synthesize", "sample a dataset from a model: data distillation, or the "
                                                   "best-rewarded of N (rejection sampling)"),
    "eval": ("maxmodel.eval.cli", "evaluate a model (lm-eval tasks, perplexity, choice, completion); eval report"),
    "label-preferences": ("maxmodel.finetune.rlaif", "RLAIF: a judge model labels pairs of completions as "
                                                     "preference JSONL (both orders asked)"),
}

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PREEMPTED = 0, 1, 2, 3


def usage() -> str:
    lines = ["usage: maxmodel <command> [args]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from maxmodel.config.errors import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return EXIT_OK if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"maxmodel: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except ConfigError as e:
        print(f"maxmodel {name}: {e}", file=sys.stderr)
        return EXIT_USAGE


def entry() -> None:
    """The `maxmodel` program (console script and `python -m maxmodel.cli`): main() under the host allocator
    XLA:CPU runs fastest with (maxmodel/host_allocator.py: restarts itself once, before JAX is imported)."""
    from maxmodel.host_allocator import restart_with_fast_allocator

    restart_with_fast_allocator()
    sys.exit(main())


if __name__ == "__main__":
    entry()
