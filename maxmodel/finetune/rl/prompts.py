"""The prompts an RL run samples from (data.format=prompt): JSONL records whose `prompt` is a string or a list
of chat messages; every other field (an answer, a test case) is handed to the reward functions.

The data pipeline's part is only *which* prompts a step takes: a seeded grain shuffle of record indices,
reshuffled every epoch, whose iterator state the checkpoint saves, so a resumed run takes the same prompts.
Every process sees the whole step's prompts (generation runs on the whole mesh); the rollout's rows are split
among processes only when the training batch is assembled.
"""
from __future__ import annotations

from pathlib import Path

import grain
import numpy as np

from maxmodel.config.errors import ConfigError
from maxmodel.config.schema import Config
from maxmodel.data.sources import BadRecords, read_documents


def read_prompts(cfg: Config, bad: BadRecords) -> list[dict]:
    d = cfg.data
    if d.source not in ("jsonl", "parquet"):
        raise ConfigError("data.source", f"RL prompts come from jsonl or parquet records, not {d.source!r}")
    records = [doc for doc, _ in read_documents(d.source, d.path, "prompt", d.text_field, bad)]
    if not records:
        raise ConfigError("data.path", f"no usable prompt records in {d.path} ({bad.total} skipped as bad)")
    return records


def prompt_tokenizer(cfg: Config, records: list[dict], run_dir: Path):
    """The policy's tokenizer: the init.from model's own files when it has them, else data.tokenizer."""
    from maxmodel.data.tokenizer import make_tokenizer
    if cfg.init.from_:
        from maxmodel.inference.load import model_tokenizer
        return model_tokenizer(Path(cfg.init.from_), cfg)
    texts = [r["prompt"] if isinstance(r["prompt"], str) else " ".join(m["content"] for m in r["prompt"])
             for r in records]
    return make_tokenizer(cfg.data.tokenizer, texts, cfg.model.vocab_size, run_dir)


def prompt_data(cfg: Config, run_dir: Path, process_index: int, process_count: int):
    """TrainData whose iterator yields {"index": [prompts per step]} record indices (the same on every
    process) and which carries the records."""
    from maxmodel.data.train_data import TrainData
    t, rl = cfg.train, cfg.rl
    bad = BadRecords(cfg.data.on_bad_record)
    records = read_prompts(cfg, bad)
    tokenizer = prompt_tokenizer(cfg, records, run_dir)
    per_step = t.batch_size // rl.group_size
    ds = grain.MapDataset.range(len(records))
    if cfg.data.shuffle:
        ds = ds.shuffle(seed=t.seed)
    ds = ds.repeat(None).batch(per_step, drop_remainder=True).map(lambda i: {"index": np.asarray(i, np.int64)})
    stats = {"source": cfg.data.source, "prompts": len(records), "tokenizer": tokenizer.id, "bad_records": bad.report()}
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    return TrainData(tokenizer, it, None, t.batch_size // process_count, process_index, process_count,
                     stats, records=records)
