"""`data.source=seqio:<name>`: a registered seqio Task or Mixture as the training source (extra `seqio`).

The task's own vocabulary, preprocessors and sharding (`seqio.ShardInfo(process, processes)`) are used; its
examples go through seqio's `DecoderFeatureConverter` (packed unless `data.packing=none`) and become the
trainer's batch keys. TensorFlow is imported here only, so the default path never loads it.

The iterator state is the number of batches consumed: the seeded tf.data pipeline is deterministic, so a
restore rebuilds it and skips that many batches.
"""
from __future__ import annotations

import importlib

import numpy as np

from maxmodel.config.errors import ConfigError
from maxmodel.config.schema import Config

from .train_data import TrainData


class SeqioTokenizer:
    """A seqio vocabulary behind the trainer's tokenizer interface. seqio starts every decoder input with
    id 0, so that is the BOS the model sees."""

    def __init__(self, vocab, name: str):
        self.vocab, self.id = vocab, f"seqio:{name}"
        self.vocab_size = vocab.vocab_size
        self.eos_id, self.pad_id, self.bos_id = vocab.eos_id, vocab.pad_id, 0

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.vocab.encode(text)]

    def decode(self, ids) -> str:
        return self.vocab.decode([int(i) for i in ids])


def _batches(task, split: str, cfg: Config, process_index: int, process_count: int, local_batch: int,
             shuffle: bool, epochs):
    import seqio
    L = cfg.train.seq_len
    ds = task.get_dataset({"targets": L}, split=split, shuffle=shuffle, seed=cfg.train.seed, num_epochs=epochs,
                          shard_info=seqio.ShardInfo(process_index, process_count), use_cached=False)
    ds = seqio.DecoderFeatureConverter(pack=cfg.data.packing != "none")(ds, {"targets": L})
    return ds.batch(local_batch, drop_remainder=True)


def _to_trainer(ex: dict) -> dict[str, np.ndarray]:
    targets = ex["decoder_target_tokens"].astype(np.int32)
    if "decoder_segment_ids" in ex:
        segments, positions = ex["decoder_segment_ids"], ex["decoder_positions"]
    else:  # unpacked: one example per row, padding is segment 0
        segments = (targets != 0).astype(np.int32)
        positions = np.broadcast_to(np.arange(targets.shape[1], dtype=np.int32), targets.shape)
    return {"inputs": ex["decoder_input_tokens"].astype(np.int32), "targets": targets,
            "segment_ids": segments.astype(np.int32), "positions": np.array(positions, np.int32),
            "loss_mask": ex["decoder_loss_weights"].astype(np.float32)}


class SeqioIterator:
    def __init__(self, make_dataset):
        self._make, self._consumed, self._it = make_dataset, 0, None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._make().skip(self._consumed).as_numpy_iterator()
        batch = _to_trainer(next(self._it))
        self._consumed += 1
        return batch

    def get_state(self) -> dict:
        return {"batches": self._consumed}

    def set_state(self, state: dict) -> None:
        self._consumed, self._it = int(state["batches"]), None


class SeqioTrainData(TrainData):
    def eval_batches(self, num_batches: int):
        if self.eval_source is None:
            return
        for ex in self.eval_source().take(num_batches).as_numpy_iterator():
            yield _to_trainer(ex)


def make_seqio_data(cfg: Config, process_index: int, process_count: int, local_batch: int) -> TrainData:
    try:
        import seqio
    except ImportError:
        raise ConfigError("data.source", "seqio sources need the extra: pip install 'maxmodel[seqio]'") from None
    name = cfg.data.source.split(":", 1)[1]
    if cfg.data.seqio_module:
        try:
            importlib.import_module(cfg.data.seqio_module)
        except ImportError as e:
            raise ConfigError("data.seqio_module", f"cannot import {cfg.data.seqio_module}: {e}") from None
    try:
        task = seqio.get_mixture_or_task(name)
    except ValueError:
        known = sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names())
        raise ConfigError("data.source", f"no seqio task or mixture '{name}'; registered: {', '.join(known)}") from None
    if "targets" not in task.output_features:
        raise ConfigError("data.source", f"seqio '{name}' has no 'targets' feature (decoder-only training)")
    tokenizer = SeqioTokenizer(task.output_features["targets"].vocabulary, name)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than seqio '{name}' "
                                              f"vocabulary's {tokenizer.vocab_size} entries")
    args = (cfg, process_index, process_count, local_batch)
    train = SeqioIterator(lambda: _batches(task, "train", *args, shuffle=cfg.data.shuffle, epochs=None))
    splits = task.splits if hasattr(task, "splits") else ()
    eval_source = (lambda: _batches(task, "validation", *args, shuffle=False, epochs=1)) \
        if "validation" in splits else None
    stats = {"source": cfg.data.source, "tokenizer": tokenizer.id, "seqio.splits": list(splits)}
    return SeqioTrainData(tokenizer, train, eval_source, local_batch, process_index, process_count, stats)
