"""Reads a MaxText training log (stdin) and prints one JSON line: the per-step seconds it reports after the
warm-up steps and the median tokens/s for batch 8 x 512."""
import json
import re
import statistics
import sys

warmup = int(sys.argv[1]) if len(sys.argv) > 1 else 3
text = sys.stdin.read()
steps = [(int(s), float(t)) for s, t in re.findall(r"completed step: (\d+), seconds: ([0-9.]+)", text)]
timed = [t for s, t in steps if s >= warmup]
if not timed:
    print(json.dumps({"peer": "maxtext", "error": "no 'completed step' lines in the log",
                      "log_tail": text[-2000:]}))
    sys.exit(1)
print(json.dumps({"peer": "maxtext", "step_times": timed, "tokens_per_sec": 8 * 512 / statistics.median(timed)}))
