"""Per-chip memory of the real train step compiled ahead of time for TPU topologies (libtpu on this CPU host):
llama3-8b and mixtral-8x7b at full width and depth, seq 4096 / 8192, v5p and v6e, splash vs XLA attention and
each `train.remat` policy, beside the planner's estimate (`maxmodel compile` prints both).

    .venv/bin/python benchmarks/aot_memory.py [--out aot_memory.jsonl] [--only llama3-8b] [--estimate-only]

Each case compiles in its own `maxmodel compile --json` process (20-90 s each on 2 cores). Results are appended
to --out as they come; a case already there is not compiled again, so an interrupted grid resumes, and
`--estimate-only` recomputes the planner's column from the recorded compiles (no compile) after the memory
model changes. "needed" is what XLA's memory analysis says one chip holds at peak (arguments + outputs −
donated + temporaries + code); for a step that does not fit, the compiler's own figure from its error.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from maxmodel.planner.layout import HBM_USABLE

GIB = 1024 ** 3
COMMON = ["train.dtype=bfloat16", "train.param_dtype=float32", "optimizer.name=adamw"]
POLICIES = ["none", "save_dots", "save_dot_except_mlp", "save_qkv_proj", "qkv_proj_offloaded",
            "save_dots_offloaded", "full"]


def grid() -> list[dict]:
    """(model, topology, mesh and batch) blocks × seq × attention × remat. Batches give each chip one
    sequence (llama3-8b) or half a chip's worth of the FSDP axis (mixtral's 47B need 32+ chips' HBM)."""
    blocks = [("llama3-8b", "v5p-8", ["mesh.fsdp=4", "train.batch_size=4"]),
              ("llama3-8b", "v6e-8", ["mesh.fsdp=8", "train.batch_size=8"]),
              ("mixtral-8x7b", "v5p-64", ["mesh.fsdp=32", "train.batch_size=32"]),
              ("mixtral-8x7b", "v6e-64", ["mesh.fsdp=64", "train.batch_size=64"])]
    cases = []
    for model, topology, layout in blocks:
        for seq in (4096, 8192):
            for impl in ("xla", "splash"):
                policies = ["full"]
                if (model, topology) == ("llama3-8b", "v5p-8"):   # every policy at 8192, and XLA's at 4096
                    policies = POLICIES if (seq, impl) == (8192, "splash") else \
                        ["none", "save_dots", "full"] if (seq, impl) == (4096, "xla") else policies
                for remat in policies:
                    cases.append({"model": model, "topology": topology, "seq_len": seq, "attention": impl,
                                  "remat": remat, "overrides": [f"model.name={model}", *layout, *COMMON,
                                                                f"train.seq_len={seq}", f"train.remat={remat}",
                                                                f"model.attention.impl={impl}"]})
    # The acceptance case: several sequences per chip at 8192 on v5p, where XLA's [L, L] scores do not fit.
    for impl, batch in (("xla", 8), ("splash", 8), ("xla", 16), ("splash", 16)):
        cases.append({"model": "llama3-8b", "topology": "v5p-8", "seq_len": 8192, "attention": impl,
                      "remat": "full", "overrides": ["model.name=llama3-8b", "mesh.fsdp=4", f"train.batch_size={batch}",
                                                     *COMMON, "train.seq_len=8192", "train.remat=full",
                                                     f"model.attention.impl={impl}"]})
    return cases


def key(case: dict) -> str:
    return " ".join(case["overrides"]) + f" @{case['topology']}"


def compile_case(case: dict) -> dict:
    t0 = time.time()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-m", "maxmodel.cli", "compile", "--topology", case["topology"],
                           "--json", *case["overrides"]], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{key(case)}: maxmodel compile exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    report = json.loads(lines[-1])
    return {**case, "key": key(case), "compile_s": round(time.time() - t0, 1), "fits": report["fits"],
            "needed_bytes": report["needed_bytes"], "hbm_bytes": report["hbm_bytes_per_device"],
            "temp_bytes": report.get("temp_bytes"), "argument_bytes": report.get("argument_bytes"),
            "host_temp_bytes": report.get("host_temp_bytes", 0), "mesh": report.get("mesh"),
            "estimate": report["estimate"]}


def reestimate(row: dict) -> dict:
    from maxmodel.config import load_config
    from maxmodel.planner.config_memory import estimate
    return {**row, "estimate": estimate(load_config(None, row["overrides"]), row["needed_bytes"], row["mesh"])}


def planner_fits(row: dict) -> bool:
    return row["estimate"]["estimate_bytes"] <= HBM_USABLE * row["hbm_bytes"]


def table(rows: list[dict]) -> str:
    out = ["| model | topology | seq | attention | remat | batch | temporaries GiB | needed GiB | HBM GiB | fits "
           "| planner GiB | planner / compiled |", "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- "
           "| ---: | ---: |"]
    for r in rows:
        batch = next(o.split("=")[1] for o in r["overrides"] if o.startswith("train.batch_size"))
        temp = f"{r['temp_bytes'] / GIB:.2f}" if r.get("temp_bytes") else "—"
        e = r["estimate"]
        out.append(f"| {r['model']} | {r['topology']} | {r['seq_len']} | {r['attention']} | {r['remat']} | {batch} "
                   f"| {temp} | {r['needed_bytes'] / GIB:.2f} | {r['hbm_bytes'] / GIB:.1f} | "
                   f"{'yes' if r['fits'] else '**no**'} | {e['estimate_bytes'] / GIB:.2f} | {e['ratio']:.2f}"
                   f"{'' if e['within_tolerance'] else ' (outside 15%)'} |")
    compiled = [r for r in rows if r.get("temp_bytes")]
    inside = sum(r["estimate"]["within_tolerance"] for r in compiled)
    agree = sum(planner_fits(r) == r["fits"] for r in rows)
    out.append(f"\n{inside} of {len(compiled)} compiled steps' estimates within 15% of the compiled figure; the "
               f"planner's fit verdict (estimate <= {HBM_USABLE:.0%} of HBM) agrees with the compiler's in {agree} of "
               f"{len(rows)} rows. Rows without temporaries did not fit: their figure is the one in XLA:TPU's "
               f"out-of-memory error, which it gives before its memory-saving passes finish.")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="aot_memory.jsonl")
    parser.add_argument("--only", nargs="*", default=[], help="model names to keep")
    parser.add_argument("--estimate-only", action="store_true", help="recompute the planner column, no compile")
    args = parser.parse_args()
    path = Path(args.out)
    done = {r["key"]: r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}
    cases = [c for c in grid() if not args.only or c["model"] in args.only]
    if args.estimate_only:
        rows = [reestimate(done[key(c)]) for c in cases if key(c) in done]
    else:
        rows = []
        for case in tqdm(cases, desc="compile", unit="case"):
            if key(case) not in done:
                done[key(case)] = compile_case(case)
                with path.open("a") as f:
                    f.write(json.dumps(done[key(case)]) + "\n")
            rows.append(done[key(case)])
    print(table(rows))


if __name__ == "__main__":
    main()
