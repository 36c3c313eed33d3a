"""The trainer's data: a grain pipeline per process, with iterator state saved in checkpoints.

Process p of n reads rows p, p+n, p+2n, ... of the one global shuffled stream, so the union of all processes'
local batches is exactly the single-process global batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import grain
import numpy as np

from maxmodel.config.errors import ConfigError
from maxmodel.config.schema import Config

from .builtin import builtin_documents, split_documents
from .tokenizer import make_tokenizer
from .windows import SyntheticSource, WindowSource, token_stream


@dataclass
class TrainData:
    tokenizer: object | None
    train: grain.DatasetIterator
    eval_source: object
    local_batch: int
    process_index: int
    process_count: int
    stats: dict = field(default_factory=dict)

    def eval_batches(self, num_batches: int):
        """The first `num_batches` global batches of held-out windows, in order (this process's rows)."""
        global_batch = self.local_batch * self.process_count
        num_batches = min(num_batches, len(self.eval_source) // global_batch)
        for b in range(num_batches):
            rows = [self.eval_source[b * global_batch + self.process_index + self.process_count * j]
                    for j in range(self.local_batch)]
            yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def unigram_cross_entropy(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Nats per token of the held-out tokens under the training set's unigram distribution (add-one)."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[eval_tokens].mean())


def _grain_iterator(source, seed: int, shuffle: bool, rows_needed: int, process_index: int,
                    process_count: int, local_batch: int) -> grain.DatasetIterator:
    ds = grain.MapDataset.source(source)
    epochs = max(1, math.ceil(rows_needed / len(source)))
    if epochs > 1:
        ds = ds.repeat(epochs)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds[process_index::process_count].batch(local_batch, drop_remainder=True)
    return iter(ds.to_iter_dataset())


def make_train_data(cfg: Config, run_dir: Path, process_index: int = 0, process_count: int = 1) -> TrainData:
    t = cfg.train
    if t.batch_size % process_count:
        raise ConfigError("train.batch_size", f"{t.batch_size} is not divisible by {process_count} processes")
    local_batch = t.batch_size // process_count
    rows_needed = t.steps * t.batch_size
    if cfg.data.source == "synthetic":
        train_src = SyntheticSource(cfg.model.vocab_size, t.seq_len, t.seed)
        eval_src = SyntheticSource(cfg.model.vocab_size, t.seq_len, t.seed + 1, size=1 << 20)
        it = _grain_iterator(train_src, t.seed, False, rows_needed, process_index, process_count, local_batch)
        return TrainData(None, it, eval_src, local_batch, process_index, process_count)
    if cfg.data.source != "builtin":
        raise ConfigError("data.source", f"'{cfg.data.source}' is not available yet; use builtin or synthetic")

    train_docs, eval_docs = split_documents(builtin_documents(), cfg.data.eval_fraction)
    tokenizer = make_tokenizer(cfg.data.tokenizer, train_docs, cfg.model.vocab_size, run_dir)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's "
                                              f"{tokenizer.vocab_size} entries")
    train_tokens, train_ids = token_stream([tokenizer.encode(d) for d in train_docs], tokenizer.bos_id,
                                           tokenizer.eos_id)
    eval_tokens, eval_ids = token_stream([tokenizer.encode(d) for d in eval_docs], tokenizer.bos_id,
                                         tokenizer.eos_id)
    train_src = WindowSource(train_tokens, train_ids, t.seq_len)
    eval_src = WindowSource(eval_tokens, eval_ids, t.seq_len)
    it = _grain_iterator(train_src, t.seed, cfg.data.shuffle, rows_needed, process_index, process_count,
                         local_batch)
    stats = {"train_tokens": int(len(train_tokens)), "eval_tokens": int(len(eval_tokens)),
             "unigram_eval_loss": unigram_cross_entropy(train_tokens, eval_tokens, cfg.model.vocab_size)}
    return TrainData(tokenizer, it, eval_src, local_batch, process_index, process_count, stats)
