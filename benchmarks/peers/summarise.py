"""Summary of a vs_peers.sh folder, per compute dtype (float32, bfloat16): median tokens/s per system over all
its rounds' timed steps, ratios of maxmodel to each peer, and MFU of each against the median matmul peak of
that dtype the maxmodel runs measured (bf16 matmuls run faster than float32 ones on CPUs with AVX-512 BF16 or
AMX, so each dtype's MFU is against its own peak). Records without a dtype are float32 (older folders)."""
import json
import statistics
import sys
from pathlib import Path

from maxmodel import jsonio

out = Path(sys.argv[1])
TOKENS = 8 * 512


def rows(name):
    path = out / f"{name}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def dtype_of(r):
    return r.get("dtype", "float32")


def summarise(dtype):
    mm = [r for r in rows("maxmodel") if "tokens_per_sec" in r and dtype_of(r) == dtype]
    if not mm:
        return None
    flops_tok = mm[0]["flops_per_token"]
    peak = statistics.median(r["peak_flops"] for r in mm)
    # maxmodel's bench reports a median per run; the peers give every step: pool the steps, then the median.
    tps = {"maxmodel": statistics.median(r["tokens_per_sec"] for r in mm)}
    notes = {}
    for name in ("maxtext", "torch"):
        peer = [r for r in rows(name) if dtype_of(r) == dtype]
        times = [t for r in peer for t in r.get("step_times", [])]
        if times:
            tps[name] = TOKENS / statistics.median(times)
        else:
            notes[name] = "; ".join(r.get("skipped") or r.get("error", "?") for r in peer) or "not run"
    return {"flops_per_token": flops_tok, "matmul_peak_flops": peak, "runs": len(mm), "tokens_per_sec": tps,
            "mfu": {k: v * flops_tok / peak for k, v in tps.items()},
            "ratio_maxmodel_to": {k: tps["maxmodel"] / v for k, v in tps.items() if k != "maxmodel"},
            "not_measured": notes}


dtypes = sorted({dtype_of(r) for r in rows("maxmodel") if "tokens_per_sec" in r}, key=lambda d: d != "float32")
summary = {d: s for d in dtypes if (s := summarise(d))}
if not summary:
    sys.exit("no maxmodel result: see the maxmodel.*.log files in " + str(out))
for dtype, s in summary.items():
    peak, tps = s["matmul_peak_flops"], s["tokens_per_sec"]
    print(f"{dtype}: model FLOPs/token {s['flops_per_token'] / 1e6:.0f} M; {dtype} matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s (median of {s['runs']})")
    for k, v in tps.items():
        print(f"  {k:<9} {v:8.1f} tokens/s   MFU {s['mfu'][k]:6.1%}")
    for k, v in s["ratio_maxmodel_to"].items():
        print(f"  maxmodel / {k}: {v:.2f}x")
    for k, v in s["not_measured"].items():
        print(f"  {k}: not measured ({v})")
print(jsonio.dumps(summary))
