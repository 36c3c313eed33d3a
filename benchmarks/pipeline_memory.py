"""Peak activation memory of the pipeline schedules as microbatches grow: XLA's memory analysis of the compiled
train step (temp bytes per device) on 8 emulated CPU devices, stage=4 x data=2, each microbatch of the same
size (2 rows per data shard), so the batch grows with the microbatch count.

    .venv/bin/python benchmarks/pipeline_memory.py [--microbatches 4 8 16] [--out results.jsonl]

GPipe differentiates through its tick loop, so it keeps every microbatch's residuals: its temp bytes grow with
M. 1F1B keeps at most `stage` stage inputs and one chunk's residuals at a time: flat apart from the [B, ...]
input / gradient buffers. Each configuration compiles in its own `maxmodel shardings --json` process.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

SCHEDULES = {"gpipe": ["pipeline.schedule=gpipe"], "1f1b": ["pipeline.schedule=1f1b"],
             "zero_bubble": ["pipeline.schedule=zero_bubble"],
             "gpipe repeats=2": ["pipeline.schedule=circular", "pipeline.repeats=2"],
             "interleaved_1f1b repeats=2": ["pipeline.schedule=interleaved_1f1b", "pipeline.repeats=2"]}
BASE = ["mesh.data=2", "mesh.stage=4", "model.num_layers=8", "train.seq_len=128"]


def measure(schedule: str, microbatches: int) -> dict:
    over = BASE + SCHEDULES[schedule] + [f"pipeline.microbatches={microbatches}",
                                         f"train.batch_size={microbatches * 2 * 2}"]
    out = subprocess.run([sys.executable, "-m", "maxmodel.cli", "shardings", "--json", *over],
                         capture_output=True, text=True, check=True).stdout
    report = json.loads(out[out.index("{"):])
    return {"schedule": schedule, "microbatches": microbatches, "batch_size": microbatches * 4,
            "temp_mib": round(report["xla_memory_analysis"]["temp_bytes"] / 2**20, 2),
            "estimate_mib": round(report["pipeline"]["peak_activation_estimate"] / 2**20, 2),
            "bubble": report["pipeline"]["bubble"], "ticks": report["pipeline"]["ticks"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = [measure(s, m) for s in args.schedules for m in args.microbatches]
    print(f"{'schedule':<28}{'M':>4}{'batch':>7}{'XLA temp MiB':>14}{'estimate MiB':>14}{'bubble':>8}{'ticks':>7}")
    for r in rows:
        print(f"{r['schedule']:<28}{r['microbatches']:>4}{r['batch_size']:>7}{r['temp_mib']:>14.2f}"
              f"{r['estimate_mib']:>14.2f}{r['bubble']:>8.3f}{r['ticks']:>7}")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
