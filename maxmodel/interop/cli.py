"""`maxmodel convert from-hf DIR --out INIT [--unscanned] [--dtype D]`
`maxmodel convert to-hf INIT --out DIR [--model-type T] [--max-shard-size GB] [--dtype D]`

from-hf turns a Hugging Face model directory (config.json + safetensors, single or sharded) into a
`maxmodel export` directory: `maxmodel train INIT/config.yaml init.from=INIT` fine-tunes it.
to-hf writes such a directory (converted, or exported from a run) back as a transformers model directory.
Families: gpt2, llama (2/3), mistral, mixtral, qwen2, gemma, gemma2, bert (BertForMaskedLM). Needs the
`interop` extra.
"""
from __future__ import annotations

import argparse

from maxmodel.config.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="maxmodel convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("from-hf", help="Hugging Face directory -> maxmodel export directory")
    a.add_argument("dir")
    a.add_argument("--out", required=True)
    a.add_argument("--unscanned", action="store_true", help="one subtree per layer (train.scan_layers=false)")
    a.add_argument("--dtype", choices=DTYPES, default="float32")
    b = sub.add_parser("to-hf", help="maxmodel export directory -> Hugging Face directory")
    b.add_argument("init")
    b.add_argument("--out", required=True)
    b.add_argument("--model-type", default=None, help="HF model_type (default: as converted, else inferred)")
    b.add_argument("--max-shard-size", type=float, default=5.0, help="GB per safetensors file (default 5)")
    b.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: as stored)")
    args = parser.parse_args(argv)
    import jax

    from maxmodel.logs import setup_logging
    setup_logging()
    # Conversion computes nothing on devices: stay on the host, never take (or probe) a TPU or GPU that a
    # training job on this machine may be using.
    jax.config.update("jax_platforms", "cpu")
    try:
        from . import convert
    except ImportError as e:
        raise ConfigError("convert", f"needs the interop extra (pip install 'maxmodel[interop]'): {e}") from None
    if args.direction == "from-hf":
        out = convert.from_hf(args.dir, args.out, scan_layers=not args.unscanned, dtype=args.dtype)
        print(f"converted {args.dir} to {out}; fine-tune with: maxmodel train {out}/config.yaml init.from={out}")
    else:
        if args.max_shard_size <= 0:
            raise ConfigError("--max-shard-size", f"must be > 0, got {args.max_shard_size}")
        out = convert.to_hf(args.init, args.out, args.model_type, int(args.max_shard_size * 2**30), args.dtype)
        print(f"wrote Hugging Face model to {out}")
    return 0
