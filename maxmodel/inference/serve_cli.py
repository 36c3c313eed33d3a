"""`maxmodel serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch N] [--max-len L]
[--prefix-cache-gb G] [--quantize int8|int4] [--kv-cache-dtype int8] [--draft MODEL2 --draft-tokens K |
--ngram K] [--model-name NAME] [key=value ...]`

Serves MODEL (a model directory from `maxmodel export` / `maxmodel convert from-hf`, or a run directory: its
latest checkpoint) over an OpenAI-compatible HTTP API (see maxmodel/inference/server.py):

  GET  /v1/models            POST /v1/completions       POST /v1/chat/completions   (stream: SSE)
  GET  /health               GET  /metrics (Prometheus) POST /tokenize, /detokenize, GET /tokenizer_info

It binds to 127.0.0.1 unless --host says otherwise (--host 0.0.0.0 exposes it to the network: use
--api-key then). With --api-key, every request except GET /health needs `Authorization: Bearer KEY`
(/health stays open for load balancers and orchestrators' probes). key=value are config overrides of the
model's config; the engine flags are `maxmodel generate`'s (one CPU device unless run.cpu_devices=N).
"""
from __future__ import annotations

import argparse
import os

from maxmodel.config import ConfigError

from .generate_cli import add_engine_args, open_model


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="maxmodel serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)  # MODEL, --max-batch, --max-len, --quantize, --kv-cache-dtype, --draft, --ngram, ...
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this host only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MAXMODEL_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $MAXMODEL_API_KEY; none: no check)")
    p.add_argument("--model-name", default=None, help="the name clients ask for (default: MODEL's directory name)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    args = p.parse_intermixed_args(argv)
    if not 0 <= args.port < 65536:
        raise ConfigError("--port", f"must be in [0, 65535], got {args.port}")
    if args.max_batch < 1:
        raise ConfigError("--max-batch", f"must be >= 1, got {args.max_batch}")
    if args.max_len < 0 or args.prefix_cache_gb < 0:
        raise ConfigError("--max-len" if args.max_len < 0 else "--prefix-cache-gb", "must be >= 0")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(bad[0], "overrides are key=value (one MODEL only)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from maxmodel.logs import setup_logging
    setup_logging()

    from .server import serve
    engine = open_model(args)  # ConfigError (exit 2) naming MODEL when it is not a model or run directory
    print(f"serving {args.model} as '{args.model_name or engine.model_name}' on http://{args.host}:{args.port}"
          f" (max_len {engine.max_len}, {engine.max_slots} slots{', API key required' if args.api_key else ''})",
          flush=True)
    serve(engine, args.host, args.port, api_key=args.api_key, model_name=args.model_name,
          log_level=args.log_level)
    return 0
