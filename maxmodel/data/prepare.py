"""`maxmodel data prepare`: tokenize a source into ArrayRecord shards with a manifest.

One shard per input file (the built-in corpus is one), written by worker processes. Each finished shard
leaves a `<shard>.done.json` receipt (counts, source hash, tokenizer id); a rerun skips shards whose
receipt matches, so an interrupted preparation resumes where it stopped. `manifest.json` is written last
and lists the documents, tokens, tokenizer and source hash of the whole set.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from maxmodel import jsonio
from maxmodel.config.errors import ConfigError
from maxmodel.config.schema import Config

from .sources import BadRecords, expand_paths, read_documents
from .store import MANIFEST
from .supervised import document_text, encode_document
from .tokenizer import load_tokenizer, train_sentencepiece_model

PREPARABLE = ("builtin", "jsonl", "text", "parquet")
SPM_TRAINING_CHARS = 20_000_000


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _builtin_hash() -> str:
    from .builtin import builtin_documents
    return hashlib.sha256("\x00".join(builtin_documents()).encode()).hexdigest()


def write_shard(task: dict) -> dict:
    """Worker: tokenize one input file into one shard; returns its receipt (also written beside it)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    tokenizer = load_tokenizer(task["tokenizer"])
    bad = BadRecords(task["on_bad_record"])
    out = Path(task["out"])
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    lengths, with_weights = [], task["format"] != "text"
    files = None if task["source"] == "builtin" else [task["file"]]
    try:
        for doc, _ in read_documents(task["source"], task["file"], task["format"], task["text_field"], bad, files):
            tokens, weights = encode_document(doc, task["format"], tokenizer, task["chat_template"])
            writer.write(tokens.tobytes() + (weights.tobytes() if with_weights else b""))
            lengths.append(len(tokens))
    finally:
        writer.close()
    tmp.replace(out)
    lengths_file = out.with_suffix(".lengths.npy")
    np.save(lengths_file, np.asarray(lengths, np.int32))
    receipt = {"file": out.name, "lengths_file": lengths_file.name, "documents": len(lengths),
               "tokens": int(sum(lengths)), "source_file": task["file"], "source_hash": task["source_hash"],
               "tokenizer_id": tokenizer.id, "bad_records": dict(bad.counts), "bad_examples": bad.examples}
    Path(task["receipt"]).write_text(jsonio.dumps(receipt))
    return receipt


def _tokenizer_for(cfg: Config, out: Path, files: list[str]) -> tuple[str, dict]:
    """(what workers load, the manifest's tokenizer entry); a file tokenizer is copied into `out`."""
    d = cfg.data
    if d.tokenizer == "spm":
        target = out / "tokenizer.model"
        if not target.is_file():
            bad = BadRecords("skip")  # a sample only: bad records are reported by the shard workers
            def lines():
                chars = 0
                for doc, _ in read_documents(d.source, d.path, d.format, d.text_field, bad, files):
                    text = document_text(doc, d.format, d.chat_template)
                    chars += len(text)
                    yield from text.splitlines()
                    if chars > SPM_TRAINING_CHARS:
                        return
            target.write_bytes(train_sentencepiece_model(lines(), cfg.model.vocab_size))
        spec = str(target)
    else:
        spec = d.tokenizer
        if Path(spec).is_file():
            target = out / f"tokenizer{Path(spec).suffix}"
            if Path(spec).resolve() != target.resolve():
                shutil.copyfile(spec, target)
            spec = str(target)
    tok = load_tokenizer(spec)
    entry = {"id": tok.id, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
             "pad_id": tok.pad_id}
    entry.update({"file": Path(spec).name} if Path(spec).is_file() else {"name": spec})
    return spec, entry


def prepare(cfg: Config, output: str | Path, workers: int | None = None, progress: bool = True) -> dict:
    """Write shards and the manifest for `data.source`/`data.path` into `output`; returns the manifest."""
    from tqdm import tqdm
    d = cfg.data
    if d.source not in PREPARABLE:
        raise ConfigError("data.source", f"prepare reads raw documents ({', '.join(PREPARABLE)}), not "
                                         f"'{d.source}'; prepare each mixture component on its own")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # incomplete until rewritten at the end
    bad = BadRecords(d.on_bad_record)  # missing input files (with skip); shards add their own counts below
    files = ["builtin"] if d.source == "builtin" else expand_paths(d.path, bad=bad)
    if not files:
        raise ConfigError("data.path", f"none of the inputs exist: {d.path}")
    tok_spec, tok_entry = _tokenizer_for(cfg, out, None if d.source == "builtin" else files)
    tasks, receipts = [], {}
    for i, file in enumerate(files):
        shard = out / f"shard-{i:05d}.arrayrecord"
        receipt_path = out / f"shard-{i:05d}.done.json"
        src_hash = _builtin_hash() if file == "builtin" else file_hash(file)
        if receipt_path.is_file() and shard.is_file():
            old = json.loads(receipt_path.read_text())
            if old["source_hash"] == src_hash and old["tokenizer_id"] == tok_entry["id"]:
                receipts[i] = old  # finished by an earlier run
                continue
        receipt_path.unlink(missing_ok=True)
        tasks.append((i, {"source": d.source, "file": file, "format": d.format, "text_field": d.text_field,
                          "chat_template": d.chat_template, "tokenizer": tok_spec, "on_bad_record": d.on_bad_record,
                          "out": str(shard), "receipt": str(receipt_path), "source_hash": src_hash}))
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    started = time.perf_counter()
    bar = tqdm(total=len(files), initial=len(receipts), disable=not progress, desc="prepare", unit="shard")
    new_tokens = 0
    if workers == 1:
        done = ((i, write_shard(task)) for i, task in tasks)
        for i, receipt in done:
            receipts[i] = receipt
            new_tokens += receipt["tokens"]
            bar.update(1)
            bar.set_postfix(tokens=f"{new_tokens:,}")
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(write_shard, task): i for i, task in tasks}
            for fut in as_completed(futures):
                receipts[futures[fut]] = fut.result()
                new_tokens += receipts[futures[fut]]["tokens"]
                bar.update(1)
                bar.set_postfix(tokens=f"{new_tokens:,}")
    bar.close()
    seconds = time.perf_counter() - started
    shards = [receipts[i] for i in sorted(receipts)]
    for r in shards:
        bad.merge(r["bad_records"], r["bad_examples"])
    manifest = {
        "version": 1, "complete": True, "source": d.source, "format": d.format,
        "fields": ["tokens"] if d.format == "text" else ["tokens", "weights"],
        "tokenizer": tok_entry, "documents": sum(r["documents"] for r in shards),
        "tokens": sum(r["tokens"] for r in shards),
        "source_hash": hashlib.sha256("".join(r["source_hash"] for r in shards).encode()).hexdigest(),
        "bad_records": bad.report(), "shards": shards,
        "last_run": {"shards_written": len(tasks), "shards_skipped": len(files) - len(tasks),
                     "tokens_written": new_tokens, "seconds": round(seconds, 3), "workers": workers,
                     "tokens_per_sec": round(new_tokens / seconds, 1) if seconds > 0 else None},
    }
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text(jsonio.dumps(manifest, indent=1))
    tmp.replace(out / MANIFEST)
    return manifest
