"""The lm-eval `hf` side of benchmarks/eval.py: lm-evaluation-harness's own HFLM on a transformers directory,
scoring token-level log-likelihood requests with `_loglikelihood_tokens` (what `loglikelihood` calls after
tokenizing), float32, CPU. Run with the Python of `.venv-hf` (torch + transformers + lm-eval). Prints ONE JSON
line: {"seconds", "requests_per_s", "tokens_per_s", "batch_size", "threads", "loglikelihoods"}.

  python hf_lm_eval.py --model DIR --requests REQUESTS.json [--batch-size 16] [--max-length 512]

REQUESTS.json: [[context ids, continuation ids], ...]. An untimed warm-up on the first batch runs first.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--requests", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM
    pairs = json.loads(Path(args.requests).read_text())
    requests = [(None, ctx, cont) for ctx, cont in pairs]
    lm = HFLM(pretrained=args.model, dtype="float32", device="cpu", batch_size=args.batch_size,
              max_length=args.max_length)
    lm._loglikelihood_tokens(requests[:args.batch_size], disable_tqdm=True)
    t0 = time.perf_counter()
    out = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    seconds = time.perf_counter() - t0
    tokens = sum(min(len(c) + len(x), args.max_length + 1) - 1 for c, x in pairs)
    print(json.dumps({"seconds": seconds, "requests_per_s": len(pairs) / seconds, "tokens_per_s": tokens / seconds,
                      "batch_size": args.batch_size, "threads": args.threads,
                      "loglikelihoods": [float(ll) for ll, _ in out]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
