"""Data throughput on one CPU core vs what the default model consumes.

  python benchmarks/data_loader.py [--mb 8] [--metrics runs/default/metrics.jsonl] [--train-steps 30]

1. prepare: tokenize a JSONL corpus (the built-in documents repeated to --mb MB) with the default run's
   tokenizer (sentencepiece, 1024 pieces) into ArrayRecord shards, one worker, pinned to one core;
2. loader: the packed grain pipeline over those shards (first_fit and concat, no prefetch threads, same
   core), at the default train.batch_size x train.seq_len;
3. consumption: tokens_per_sec of the default model from a metrics.jsonl, or from a short `maxmodel train`.
Prints one JSON object; the target is loader >= 10x consumption.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from maxmodel import jsonio


def make_corpus(root: Path, megabytes: float) -> Path:
    from maxmodel.data.builtin import builtin_documents
    docs = builtin_documents()
    path, size, i = root / "corpus.jsonl", 0, 0
    with open(path, "w") as f:
        while size < megabytes * 1e6:
            line = jsonio.dumps({"text": docs[i % len(docs)]}) + "\n"
            f.write(line)
            size, i = size + len(line), i + 1
    return path


def loader_tokens_per_sec(shards: Path, packing: str, batches: int, run_dir: Path) -> dict:
    from maxmodel.config import load_config
    from maxmodel.data.pipeline import make_train_data
    cfg = load_config(overrides=["data.source=arrayrecord", f"data.path={shards}", f"data.packing={packing}",
                                 "data.prefetch=0", "data.workers=0", "train.steps=100000"])
    start = time.perf_counter()
    data = make_train_data(cfg, run_dir)
    setup = time.perf_counter() - start
    next(data.train)
    start = time.perf_counter()
    for _ in range(batches):
        next(data.train)
    seconds = time.perf_counter() - start
    tokens = batches * cfg.train.batch_size * cfg.train.seq_len
    return {"tokens_per_sec": round(tokens / seconds), "setup_seconds": round(setup, 2),
            "packed_efficiency": data.stats["arrayrecord.packed_efficiency"],
            "batch": f"{cfg.train.batch_size}x{cfg.train.seq_len}"}


def trainer_tokens_per_sec(metrics: str | None, steps: int, root: Path) -> tuple[float, str]:
    if metrics is None:
        cmd = [sys.executable, "-m", "maxmodel.cli", "train", f"train.steps={steps}", "run.log_every=10",
               f"run.eval_every={steps}", "run.eval_batches=1", "checkpoint.enabled=false", "run.progress=false",
               "run.sample_tokens=0", f"run.output_dir={root}", "run.name=bench"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = str(root / "bench" / "metrics.jsonl")
    records = [json.loads(line) for line in Path(metrics).read_text().splitlines()]
    return float(records[-1]["tokens_per_sec"]), metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0, help="corpus size in MB of JSONL")
    parser.add_argument("--batches", type=int, default=300, help="loader batches timed")
    parser.add_argument("--metrics", help="a metrics.jsonl of the default model (else a short run is made)")
    parser.add_argument("--train-steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        consumed, source = trainer_tokens_per_sec(args.metrics, args.train_steps, root)  # all cores
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # from here on: one core
        from maxmodel.config import load_config
        from maxmodel.data.prepare import prepare
        corpus = make_corpus(root, args.mb)
        # The default run's tokenizer (trained once, cached): prepare measures tokenizing, not training.
        from maxmodel.data.builtin import builtin_documents, split_documents
        from maxmodel.data.tokenizer import train_sentencepiece
        model = train_sentencepiece(split_documents(builtin_documents(), 0.05)[0], 1024, root / "tok.model")
        cfg = load_config(overrides=["data.source=jsonl", f"data.path={corpus}", f"data.tokenizer={model}"])
        manifest = prepare(cfg, root / "shards", workers=1, progress=False)
        out = {"corpus_mb": round(corpus.stat().st_size / 1e6, 2), "documents": manifest["documents"],
               "tokens": manifest["tokens"], "prepare_tokens_per_sec": manifest["last_run"]["tokens_per_sec"]}
        for packing in ("first_fit", "concat"):
            out[f"loader_{packing}"] = loader_tokens_per_sec(root / "shards", packing, args.batches, root)
        out["trainer_tokens_per_sec"] = round(consumed)
        out["trainer_metrics"] = source if args.metrics else "short `maxmodel train` run (default model)"
        loader = min(out["loader_first_fit"]["tokens_per_sec"], out["loader_concat"]["tokens_per_sec"])
        out["loader_over_trainer"] = round(loader / consumed, 1)
        out["prepare_over_trainer"] = round(out["prepare_tokens_per_sec"] / consumed, 1)
    print(jsonio.dumps(out, indent=1))


if __name__ == "__main__":
    main()
