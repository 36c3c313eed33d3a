"""`maxmodel tokenizer train --input FILE [FILE ...] --vocab-size N --type bpe|unigram --output PATH.model`

Trains a sentencepiece model (byte fallback on, so any text encodes; no normalisation, so text decodes back
exactly) on the user's text: plain text files, JSONL (field --text-field) or Parquet, chosen by extension.
`maxmodel tokenizer encode --tokenizer SPEC TEXT` prints the ids and the decoded text.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from maxmodel import jsonio
from maxmodel.config.errors import ConfigError

from .sources import BadRecords, expand_paths, read_documents
from .tokenizer import load_tokenizer, train_sentencepiece_model


def source_of(file: str) -> str:
    name = file.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        return "jsonl"
    return "parquet" if name.endswith(".parquet") else "text"


def train(inputs: list[str], vocab_size: int, model_type: str, output: str, text_field: str = "text",
          on_bad_record: str = "error") -> Path:
    bad = BadRecords(on_bad_record)
    files = expand_paths(inputs, key="--input", bad=bad)

    def lines():
        for file in files:
            for doc, _ in read_documents(source_of(file), None, "text", text_field, bad, [file]):
                yield from doc.splitlines()
    model = train_sentencepiece_model(lines(), vocab_size, model_type, key="--vocab-size")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="maxmodel tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a sentencepiece model on your text")
    t.add_argument("--input", nargs="+", required=True, help="text/JSONL/Parquet files or globs")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--type", choices=("bpe", "unigram"), default="bpe")
    t.add_argument("--output", required=True, help="where to write the .model file")
    t.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text")
    t.add_argument("--on-bad-record", choices=("error", "skip"), default="error")
    e = sub.add_parser("encode", help="encode text with a tokenizer and decode it back")
    e.add_argument("--tokenizer", required=True, help="bytes, tiktoken:<name>, or a .model/.json/.tiktoken file")
    e.add_argument("text")
    args = parser.parse_args(argv)
    if args.command == "train":
        if args.vocab_size <= 0:
            raise ConfigError("--vocab-size", f"must be > 0, got {args.vocab_size}")
        out = train(args.input, args.vocab_size, args.type, args.output, args.text_field, args.on_bad_record)
        tok = load_tokenizer(str(out))
        print(f"wrote {out} ({tok.vocab_size} pieces, {args.type}, byte fallback; id {tok.id})")
        return 0
    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(args.text)
    print(jsonio.dumps({"ids": ids, "decoded": tok.decode(ids), "vocab_size": tok.vocab_size,
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}))
    return 0
