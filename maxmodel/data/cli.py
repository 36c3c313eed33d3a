"""`maxmodel data prepare [CONFIG.yaml] [data.key=value ...] --output DIR [--workers N]`

Tokenizes `data.source` / `data.path` (with `data.tokenizer`, `data.format`, `data.text_field`,
`data.on_bad_record`) into ArrayRecord shards; train on them with `data.source=arrayrecord data.path=DIR`.
"""
from __future__ import annotations

import argparse

from maxmodel import jsonio
from maxmodel.config import load_config_args


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="maxmodel data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize a source into ArrayRecord shards with a manifest")
    p.add_argument("args", nargs="*", help="an optional CONFIG.yaml, then key.sub=value overrides")
    p.add_argument("--output", required=True, help="directory for the shards and manifest.json")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    args = parser.parse_args(argv)
    cfg = load_config_args(args.args)
    from .prepare import prepare
    manifest = prepare(cfg, args.output, args.workers, progress=not args.no_progress)
    summary = {k: manifest[k] for k in ("documents", "tokens", "source_hash", "bad_records", "last_run")}
    summary["tokenizer"] = manifest["tokenizer"]["id"]
    summary["shards"] = len(manifest["shards"])
    if args.json:
        print(jsonio.dumps(summary))
    else:
        run = manifest["last_run"]
        print(f"{args.output}: {summary['shards']} shards, {summary['documents']:,} documents, "
              f"{summary['tokens']:,} tokens (tokenizer {summary['tokenizer']})")
        print(f"this run: {run['shards_written']} shards written, {run['shards_skipped']} already done, "
              f"{run['tokens_per_sec'] or 0:,.0f} tokens/s with {run['workers']} workers")
        if manifest["bad_records"]["skipped"]:
            print(f"skipped bad records: {manifest['bad_records']['by_reason']}")
    return 0
