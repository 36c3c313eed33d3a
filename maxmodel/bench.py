"""`maxmodel bench [CONFIG.yaml] [key=value ...] [--steps N] [--warmup W] [--results FILE]`

Times the train step of a config on its mesh: compile time, then W warm-up steps, then N timed steps, each
waited for. Prints one JSON line and appends it to the results file (default benchmarks/results.jsonl) with
the git revision: tokens/s, step time median and p90, compile time, MFU (PaLM appendix B, with the attention
term; peak from the chip table, or on CPU a large matmul in train.dtype measured in this same run), peak memory.

`maxmodel bench --suite data|checkpoint|generate [args...]` runs benchmarks/data_loader.py, checkpoint.py or generate.py
(their own options follow).
"""
from __future__ import annotations

import argparse
import os
import resource
import runpy
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from maxmodel import jsonio
from maxmodel.config import ConfigError, load_config
from maxmodel.config.loader import split_config_args

REPO = Path(__file__).resolve().parents[1]
SUITES = {"data": "data_loader.py", "checkpoint": "checkpoint.py", "generate": "generate.py"}


def git_revision() -> str:
    """HEAD's hash, with '+dirty' when tracked files differ from it; 'unknown' outside a checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=False).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def peak_memory_bytes() -> tuple[int, str]:
    """Largest memory in use so far: the accelerator's own counter, or this process's peak RSS on CPU."""
    import jax
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def time_steps(cfg, steps: int, warmup: int) -> dict:
    """Compile the step ahead of time, then run warm-up and timed steps on pre-fetched device batches."""
    import jax
    from flax import nnx

    from maxmodel import distributed
    from maxmodel.data.pipeline import make_train_data
    from maxmodel.parallel.mesh import build_mesh
    from maxmodel.parallel.rules import mesh_rules
    from maxmodel.train.metrics import flops_per_token, matmul_params, peak_flops_per_device
    from maxmodel.train.step import abstract_state, build_train_step, create_params, global_batch

    distributed.initialize(cfg.run.cpu_devices)
    # same load as the steps timed below, and the step's compute dtype (bf16 matmuls run faster on some CPUs)
    peak, peak_source = peak_flops_per_device(remeasure=True, dtype=cfg.train.dtype)
    mesh = build_mesh(cfg.mesh)
    rules = mesh_rules(cfg.mesh, mesh)
    data = make_train_data(cfg, Path(cfg.run.output_dir) / cfg.run.name)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        graphdef, abstract = abstract_state(cfg)
        ts = build_train_step(cfg, graphdef, abstract, mesh)
        params = create_params(cfg, ts.param_shardings)
        opt_state = ts.init_opt(params)
        # Batches are made before timing: this measures the step, the data benchmark measures the loader.
        batches = [global_batch(next(data.train), mesh) for _ in range(min(steps + warmup, 4))]
        t0 = time.perf_counter()
        compiled = ts.step_fn.lower(params, opt_state, batches[0]).compile()
        compile_seconds = time.perf_counter() - t0
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            params, opt_state, metrics = compiled(params, opt_state, batches[i % len(batches)])
            jax.block_until_ready((params, metrics))
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        loss = float(jax.device_get(metrics["loss"]))
        flops_tok = flops_per_token(cfg.model, matmul_params(abstract), cfg.train.seq_len,
                                    cfg.model.tie_embeddings)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    median = float(np.median(times))
    tps = tokens / median
    memory, memory_source = peak_memory_bytes()
    peak_total = peak * jax.device_count()
    return {"tokens_per_sec": tps, "step_time_median": median, "step_time_p90": float(np.percentile(times, 90)),
            "compile_seconds": compile_seconds, "dtype": cfg.train.dtype, "flops_per_token": flops_tok, "peak_flops": peak_total,
            "peak_source": peak_source, "mfu": tps * flops_tok / peak_total, "peak_memory_bytes": memory,
            "memory_source": memory_source, "final_loss": loss, "steps": steps, "warmup": warmup,
            "devices": jax.device_count(), "platform": jax.devices()[0].platform,
            "mesh": {k: int(v) for k, v in mesh.shape.items()}}


def run_suite(name: str, args: list[str]) -> int:
    """Hand over to the suite's own script, as if run from the command line."""
    script = REPO / "benchmarks" / SUITES[name]
    if not script.exists():
        raise ConfigError("--suite", f"{script} not found (the benchmarks/ folder ships with the repository)")
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(prog="maxmodel bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", help="an optional CONFIG.yaml, then key.sub=value overrides")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results.jsonl"),
                        help="JSON-lines file the result is appended to")
    parser.add_argument("--label", default="", help="free text stored with the result")
    parser.add_argument("--suite", choices=sorted(SUITES), help="run the data-loader, checkpoint or generation benchmark")
    return parser.parse_known_args(argv)


def main(argv: list[str]) -> int:
    args, extra = parse(argv)
    if args.suite:
        return run_suite(args.suite, args.args + extra)
    if extra:
        raise ConfigError("bench", f"unknown options {extra}")
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError("--steps" if args.steps < 1 else "--warmup", "must be >= 1 (steps) and >= 0 (warmup)")
    config_file, overrides = split_config_args(args.args)
    cfg = load_config(config_file, overrides)
    result = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "revision": git_revision(),
              "config": config_file or "base", "overrides": overrides, "label": args.label,
              "load_average": os.getloadavg()[0], **time_steps(cfg, args.steps, args.warmup)}
    line = jsonio.dumps(result)
    print(line)
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line + "\n")
    return 0
