"""Summary of a vs_peers.sh folder: median tokens/s per system over all its rounds' timed steps, ratios of
maxmodel to each peer, and MFU of each against the median matmul peak the maxmodel runs measured."""
import json
import statistics
import sys
from pathlib import Path

from maxmodel import jsonio

out = Path(sys.argv[1])


def rows(name):
    path = out / f"{name}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


mm = [r for r in rows("maxmodel") if "tokens_per_sec" in r]
if not mm:
    sys.exit("no maxmodel result: see the maxmodel.*.log files in " + str(out))
flops_tok = mm[0]["flops_per_token"]
peak = statistics.median(r["peak_flops"] for r in mm)
tokens = 8 * 512
# maxmodel's bench reports a median per run; the peers give every step: pool the steps, then take the median.
tps = {"maxmodel": statistics.median(r["tokens_per_sec"] for r in mm)}
notes = {}
for name in ("maxtext", "torch"):
    times = [t for r in rows(name) for t in r.get("step_times", [])]
    if times:
        tps[name] = tokens / statistics.median(times)
    else:
        notes[name] = "; ".join(r.get("skipped") or r.get("error", "?") for r in rows(name)) or "not run"

summary = {"flops_per_token": flops_tok, "matmul_peak_flops": peak, "runs": len(mm), "tokens_per_sec": tps,
           "mfu": {k: v * flops_tok / peak for k, v in tps.items()},
           "ratio_maxmodel_to": {k: tps["maxmodel"] / v for k, v in tps.items() if k != "maxmodel"},
           "not_measured": notes}
print(f"model FLOPs/token {flops_tok / 1e6:.0f} M; matmul peak {peak / 1e9:.1f} GFLOP/s (median of {len(mm)})")
for k, v in tps.items():
    print(f"  {k:<9} {v:8.1f} tokens/s   MFU {v * flops_tok / peak:6.1%}")
for k, v in summary["ratio_maxmodel_to"].items():
    print(f"  maxmodel / {k}: {v:.2f}x")
for k, v in notes.items():
    print(f"  {k}: not measured ({v})")
print(jsonio.dumps(summary))
