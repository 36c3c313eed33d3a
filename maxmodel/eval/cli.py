"""`maxmodel eval MODEL --tasks T1,T2 [--include-path DIR] [--num-fewshot K] [--limit N] [--output results.json]
[--log-samples] [key=value ...]`  and  `maxmodel eval report RUN_OR_RESULTS... --out eval.png`

MODEL is a run directory (its latest checkpoint) or a model directory (`maxmodel export`, `maxmodel convert
from-hf`). Tasks are lm-eval task names (its catalogue, or task YAMLs under --include-path, e.g. with
`dataset_path: json` and local `data_files`: nothing is downloaded) or native tasks: `perplexity` (the
built-in held-out split), `perplexity:PATH`, `choice:FILE.jsonl`, `completion:FILE.jsonl`, or a native task
YAML under --include-path (see maxmodel/eval/native.py). lm-eval tasks run through lm-eval's
`simple_evaluate` with the `maxmodel` backend; the results file has lm-eval's structure.

Exit codes: 0 every task ran; 2 bad usage, an unknown task, or a task whose input is bad (the message names
the file and line); 1 a task failed otherwise. The tasks that finished are in the results either way.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from maxmodel.config import ConfigError


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="maxmodel eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run directory or model directory")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--include-path", default=None, help="a directory of task YAMLs (lm-eval's or native ones)")
    p.add_argument("--only-include-path", action="store_true",
                   help="do not index lm-eval's own task catalogue (faster; every lm-eval task is under --include-path)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task")
    p.add_argument("--output", default=None, help="write the results JSON here")
    p.add_argument("--log-samples", action="store_true", help="keep every request and response in the results")
    p.add_argument("--max-length", type=int, default=0, help="longest sequence in tokens (0 = model.max_seq_len)")
    p.add_argument("--batch-rows", type=int, default=16, help="packed rows per forward pass")
    p.add_argument("--row-len", type=int, default=256, help="shortest packed row (longer batches use longer rows)")
    p.add_argument("--max-batch", type=int, default=16, help="decode slots for generative tasks")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (lm-eval's and native tasks')")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="lm-eval's bootstrap for standard errors")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the model's config")
    args = p.parse_intermixed_args(argv)
    for flag in ("num_fewshot", "limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')}", "must be >= 0")
    if args.batch_rows < 1 or args.row_len < 1 or args.max_batch < 1 or args.max_length < 0:
        raise ConfigError("--batch-rows", "--batch-rows, --row-len and --max-batch must be >= 1, --max-length >= 0")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(bad[0], "overrides are key=value (one MODEL only)")
    if args.include_path and not Path(args.include_path).is_dir():
        raise ConfigError("--include-path", f"{args.include_path} is not a directory")
    return args


def main(argv: list[str]) -> int:
    if argv and argv[0] == "report":
        from .report import main as report_main
        return report_main(argv[1:])
    args = parse_args(argv)
    from maxmodel.logs import setup_logging
    setup_logging()
    from .model import EvalModel
    from .runner import TaskPlan, evaluate, flat_metrics
    plan = TaskPlan([t.strip() for t in args.tasks.split(",") if t.strip()], args.include_path,
                    lm_eval_catalog=not args.only_include_path)  # unknown names fail before the model loads
    overrides = list(args.overrides)
    if not any(o.startswith("mesh.") for o in overrides):  # the training layout need not fit these devices
        overrides += ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.expert=1"]
    model = EvalModel.load(args.model, overrides, args.max_length, args.batch_rows, args.row_len, args.max_batch)
    import jax
    if jax.process_index() != 0:  # process 0 drives the tasks; this one joins its forward passes
        model.scorer.follow()
        return 0
    try:
        results = evaluate(model, plan, args.num_fewshot, args.limit, args.log_samples, args.bootstrap_iters,
                           args.seed)
    finally:
        model.scorer.close()
    if args.output:
        _write(Path(args.output), results)
    for key, value in sorted(flat_metrics(results).items()):
        print(f"{key:<48} {value:.6g}")
    failed = results["maxmodel"]["failed"]
    for name, why in failed.items():
        print(f"maxmodel eval: task {name} failed: {why}", file=sys.stderr)
    if not failed:
        return 0
    return 2 if results["maxmodel"]["bad_input"] else 1


def _write(path: Path, results: dict) -> None:
    def default(o):
        try:
            from lm_eval.utils import handle_non_serializable
            return handle_non_serializable(o)
        except ImportError:
            return str(o)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=default, ensure_ascii=False))
