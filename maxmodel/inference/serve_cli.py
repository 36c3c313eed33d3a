"""`maxmodel serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch N] [--max-len L]
[--prefix-cache-gb G] [--quantize int8|int4] [--kv-cache-dtype int8] [--model-name NAME] [key=value ...]`

Serves MODEL (a model directory from `maxmodel export` / `maxmodel convert from-hf`, or a run directory: its
latest checkpoint) over an OpenAI-compatible HTTP API (see maxmodel/inference/server.py):

  GET  /v1/models            POST /v1/completions       POST /v1/chat/completions   (stream: SSE)
  GET  /health               GET  /metrics (Prometheus) POST /tokenize, /detokenize, GET /tokenizer_info

It binds to 127.0.0.1 unless --host says otherwise (--host 0.0.0.0 exposes it to the network: use
--api-key then). With --api-key, every request except GET /health needs `Authorization: Bearer KEY`
(/health stays open for load balancers and orchestrators' probes). key=value are config overrides of the
model's config, as for `maxmodel generate`.
"""
from __future__ import annotations

import argparse
import os

from maxmodel.config import ConfigError


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="maxmodel serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model directory or run directory")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this host only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MAXMODEL_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $MAXMODEL_API_KEY; none: no check)")
    p.add_argument("--model-name", default=None, help="the name clients ask for (default: MODEL's directory name)")
    p.add_argument("--max-batch", type=int, default=None, help="decode-batch rows (concurrent sequences)")
    p.add_argument("--max-len", type=int, default=None, help="longest prompt + completion (default: the model's)")
    p.add_argument("--prefix-cache-gb", type=float, default=None, help="memory for cached prompt prefixes")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None, help="weight-only quantization")
    p.add_argument("--kv-cache-dtype", choices=("int8",), default=None, help="quantize the KV cache")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_intermixed_args(argv)
    for flag, value in (("--port", args.port), ("--max-batch", args.max_batch), ("--max-len", args.max_len)):
        if value is not None and value < (0 if flag == "--port" else 1):
            raise ConfigError(flag, f"must be a positive integer, got {value}")
    if args.prefix_cache_gb is not None and args.prefix_cache_gb < 0:
        raise ConfigError("--prefix-cache-gb", f"must be >= 0, got {args.prefix_cache_gb}")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(bad[0], "overrides are key=value (one MODEL only)")
    return args


def engine_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {}
    if args.max_batch is not None:
        kwargs["max_slots"] = args.max_batch
    if args.max_len is not None:
        kwargs["max_len"] = args.max_len
    if args.kv_cache_dtype == "int8":
        kwargs["kv_int8"] = True
    if args.quantize:
        kwargs["quantize"] = args.quantize
    if args.prefix_cache_gb:
        kwargs["prefix_cache_gb"] = args.prefix_cache_gb
    return kwargs


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from maxmodel.train.cli import setup_logging
    setup_logging()

    from .load import load_engine
    from .server import serve
    kwargs = engine_kwargs(args)
    try:
        engine = load_engine(args.model, list(args.overrides), **kwargs)
    except TypeError as e:  # an option this engine build does not take
        flag = next((f"--{k.replace('_', '-')}" for k in kwargs if k in str(e)), "MODEL")
        raise ConfigError(flag, f"not supported by this engine: {e}") from None
    print(f"serving {args.model} as '{args.model_name or engine.model_name}' on http://{args.host}:{args.port}"
          f" (max_len {engine.max_len}, {engine.max_slots} slots{', API key required' if args.api_key else ''})",
          flush=True)
    serve(engine, args.host, args.port, api_key=args.api_key, model_name=args.model_name,
          log_level=args.log_level)
    return 0
