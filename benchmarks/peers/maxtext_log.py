"""Reads a MaxText training log (stdin) and prints one JSON line: per-step wall seconds after the warm-up
steps and the median tokens/s for batch 8 x 512.

  maxtext_log.py [WARMUP] [DTYPE] < LOG   (DTYPE, default float32, is only recorded in the line)

MaxText's own `seconds:` field is host time between dispatches; on CPU the host runs ahead of the
computation, so it is far below the real step time. The real time is the gap between the log timestamps of
consecutive `completed step` lines (steady state: one step per line)."""
import json
import re
import statistics
import sys
from datetime import datetime

warmup = int(sys.argv[1]) if len(sys.argv) > 1 else 3
dtype = sys.argv[2] if len(sys.argv) > 2 else "float32"
text = sys.stdin.read()
pattern = r"^I(\d{4} \d\d:\d\d:\d\d\.\d+) .*completed step: (\d+), seconds: ([0-9.]+)"
lines = [(datetime.strptime(ts, "%m%d %H:%M:%S.%f"), int(s), float(t))
         for ts, s, t in re.findall(pattern, text, re.MULTILINE)]
timed = [(b[0] - a[0]).total_seconds() for a, b in zip(lines, lines[1:]) if b[1] >= max(warmup, 1)]
if not timed:
    print(json.dumps({"peer": "maxtext", "dtype": dtype, "error": "fewer than two 'completed step' lines after warm-up",
                      "log_tail": text[-2000:]}))
    sys.exit(1)
print(json.dumps({"peer": "maxtext", "dtype": dtype, "step_times": timed, "tokens_per_sec": 8 * 512 / statistics.median(timed),
                  "reported_seconds": [t for _, s, t in lines if s >= warmup]}))
