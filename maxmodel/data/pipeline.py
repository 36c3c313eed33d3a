"""The trainer's data: a grain pipeline per process, with iterator state saved in checkpoints.

documents (raw sources tokenized at start-up, or prepared ArrayRecord shards) -> held-out split -> packed
rows (random access, see packing.py) -> seeded shuffle per component, reshuffled every epoch -> weighted
mixture (grain's MapDataset.mix) -> the objective's corruption (masked_lm, see objectives.py) ->
rows p, p+n, ... for process p of n -> local batches -> prefetch
(threads, or `data.workers` processes). The union of all processes' local batches is exactly the
single-process global batch, and the iterator state is a few integers (JSON).
"""
from __future__ import annotations

import logging
from pathlib import Path

import grain
import numpy as np

from maxmodel import jsonio
from maxmodel.config.errors import ConfigError
from maxmodel.config.schema import Config
from maxmodel.finetune.peft.config import prompt_slots

from .chat_template import ChatTemplateError, check_renders, is_jinja_spec, template_for
from .mixture import Component, components, realised_proportions
from .objectives import PrefixSplit, masked_lm
from .packing import IndexedStore, make_rows
from .seq2seq import Seq2SeqRows
from .sources import BadRecords, read_documents
from .store import MemoryStore, ShardStore
from .supervised import document_text, encode_document
from .tokenizer import load_tokenizer, make_tokenizer
from .train_data import TrainData
from .windows import SyntheticSource

log = logging.getLogger("maxmodel.data")
SPM_TRAINING_CHARS = 20_000_000  # enough text for a sentencepiece model; more only costs time


def unigram_cross_entropy(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Nats per token of the held-out tokens under the training set's unigram distribution (add-one)."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[eval_tokens].mean())


def held_out_split(num_docs: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Every k-th document held out, so both splits sample the whole source (as builtin.split_documents)."""
    every = max(2, round(1 / eval_fraction))
    ids = np.arange(num_docs)
    return ids[ids % every != every - 1], ids[ids % every == every - 1]


def _read_raw(comp: Component, path, bad: BadRecords, template=None) -> list:
    """The documents; with a Jinja chat template, only those it renders (each failure named by file:line)."""
    docs = []
    for doc, where in read_documents(comp.source, path, comp.format, comp.text_field, bad):
        if template is not None and comp.format == "chat":
            try:
                check_renders(doc["messages"], template)
            except ChatTemplateError as e:
                bad(where, str(e), "template does not render")
                continue
        docs.append(doc)
    return docs


def _choose_tokenizer(cfg: Config, comps: list[Component], raw: dict, shards: dict, run_dir: Path):
    """Prepared shards fix the tokenizer (their manifest's); otherwise `data.tokenizer` decides."""
    specs = {name: s.tokenizer_spec() for name, s in shards.items()}
    if len({s["id"] for s in specs.values()}) > 1:
        raise ConfigError("data.mixture", f"prepared datasets use different tokenizers: {specs}")
    if specs:
        name, spec = next(iter(specs.items()))
        tok_dir = Path(shards[name].files[0]).parent
        tokenizer = load_tokenizer(str(tok_dir / spec["file"]) if spec.get("file") else spec["name"])
        if cfg.data.tokenizer != "spm" and load_tokenizer(cfg.data.tokenizer).id != tokenizer.id:
            raise ConfigError("data.tokenizer", f"{cfg.data.tokenizer} differs from the tokenizer the shards "
                                                f"were prepared with ({spec['id']})")
        return tokenizer
    texts, chars = [], 0
    for comp in comps:
        docs = raw[comp.name][0]
        train_ids = held_out_split(len(docs), cfg.data.eval_fraction)[0] if raw[comp.name][1] is None \
            else range(len(docs))
        for i in train_ids:
            if chars > SPM_TRAINING_CHARS:
                break
            texts.append(document_text(docs[i], comp.format, cfg.data.chat_template, cfg.data.tokenizer))
            chars += len(texts[-1])
    return make_tokenizer(cfg.data.tokenizer, texts, cfg.model.vocab_size, run_dir)


def _encode(docs: list, comp: Component, tokenizer, template: str) -> MemoryStore:
    return MemoryStore([encode_document(d, comp.format, tokenizer, template) for d in docs])


def _splits(cfg: Config, comps, raw, shards, tokenizer, bad) -> dict:
    """name -> (train store, eval store or None)."""
    out = {}
    for comp in comps:
        if comp.name in shards:
            store = shards[comp.name]
            held = ShardStore([comp.eval_path], bad, f"{comp.key}.eval_path") if comp.eval_path else None
        elif comp.format == "preference":  # groups of documents (a pair, a ranked list, ...) per record
            from .preference import encode_groups
            docs, eval_docs = raw[comp.name]
            store, held = (None if d is None else encode_groups(
                d, cfg.train.objective, tokenizer, cfg.data.chat_template, cfg.train.seq_len, cfg.dpo.max_docs, bad)
                for d in (docs, eval_docs))
        else:
            docs, eval_docs = raw[comp.name]
            store = _encode(docs, comp, tokenizer, cfg.data.chat_template)
            held = _encode(eval_docs, comp, tokenizer, cfg.data.chat_template) if eval_docs is not None else None
        if held is None:
            train_ids, eval_ids = held_out_split(len(store), cfg.data.eval_fraction)
            store, held = IndexedStore(store, train_ids), IndexedStore(store, eval_ids)
        out[comp.name] = (store, held)
    return out


def _rows_or_none(store, cfg: Config, pad_id: int, fmt: str = "text", task: int = 0):
    prefix = cfg.train.objective == "prefix_lm"
    if prefix and fmt == "text":  # supervised formats already have their prompt as the prefix
        store = PrefixSplit(store, cfg.train.seed)
    try:
        if fmt == "preference":  # a group never splits; rows are filled first-fit (or one group per row)
            from .preference import PreferenceRows
            return PreferenceRows(store, cfg.train.seq_len, pad_id, cfg.data.packing, cfg.dpo.max_docs)
        if cfg.train.objective == "seq2seq":  # (source, target) pairs packed on both sides
            return Seq2SeqRows(store, cfg.train.seq_len, pad_id, cfg.data.packing, fmt)
        return make_rows(store, cfg.train.seq_len, pad_id, cfg.data.packing, prefix, prompt_slots(cfg), task)
    except ValueError:
        return None


def _iterator(ds: grain.MapDataset, cfg: Config) -> grain.DatasetIterator:
    d = cfg.data
    if d.workers > 0:
        import absl.flags
        absl.flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        return iter(it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.workers,
                                                                   per_worker_buffer_size=max(1, d.prefetch))))
    threads = 2 if d.prefetch > 0 else 0
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=d.prefetch)))


def _synthetic(cfg: Config, process_index: int, process_count: int, local_batch: int) -> TrainData:
    t = cfg.train
    seq2seq = t.objective == "seq2seq"
    train_src = SyntheticSource(cfg.model.vocab_size, t.seq_len, t.seed, seq2seq=seq2seq)
    eval_src = SyntheticSource(cfg.model.vocab_size, t.seq_len, t.seed + 1, size=1 << 20, seq2seq=seq2seq)
    ds = grain.MapDataset.source(train_src)[process_index::process_count].batch(local_batch, drop_remainder=True)
    return TrainData(None, _iterator(ds, cfg), eval_src, local_batch, process_index, process_count,
                     {"source": "synthetic"})


def make_train_data(cfg: Config, run_dir: Path, process_index: int = 0, process_count: int = 1) -> TrainData:
    t, d = cfg.train, cfg.data
    if t.batch_size % process_count:
        raise ConfigError("train.batch_size", f"{t.batch_size} is not divisible by {process_count} processes")
    local_batch = t.batch_size // process_count
    if t.objective in ("masked_lm", "prefix_lm") and d.source == "synthetic":  # seq2seq has synthetic pairs
        raise ConfigError("data.source", f"train.objective={t.objective} needs documents and a tokenizer "
                                         f"(builtin, jsonl, text, parquet, arrayrecord, mixture), not synthetic")
    if d.format == "prompt":  # RL: the pipeline chooses prompts; rollouts make the rows (finetune/rl)
        from maxmodel.finetune.rl.prompts import prompt_data
        return prompt_data(cfg, run_dir, process_index, process_count)
    if d.source == "synthetic":
        return _synthetic(cfg, process_index, process_count, local_batch)
    if d.source.startswith("seqio:"):
        from .seqio_bridge import make_seqio_data
        return make_seqio_data(cfg, process_index, process_count, local_batch)

    bad = BadRecords(d.on_bad_record)
    comps = components(cfg)
    template = template_for(d.chat_template, d.tokenizer) if is_jinja_spec(d.chat_template) else None
    raw, shards = {}, {}
    for comp in comps:
        if comp.source == "arrayrecord":
            entries = comp.path if isinstance(comp.path, list) else [comp.path]
            if comp.path in (None, "", []):
                raise ConfigError(f"{comp.key}.path", "set it to a directory made by `maxmodel data prepare`")
            shards[comp.name] = ShardStore(entries, bad, f"{comp.key}.path")
        else:
            docs = _read_raw(comp, comp.path, bad, template)
            eval_docs = _read_raw(comp, comp.eval_path, bad, template) if comp.eval_path else None
            if not docs:
                raise ConfigError(f"{comp.key}.path", f"no usable documents in {comp.path} "
                                                      f"({bad.total} skipped as bad)")
            raw[comp.name] = (docs, eval_docs)
    tokenizer = _choose_tokenizer(cfg, comps, raw, shards, run_dir)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's "
                                              f"{tokenizer.vocab_size} entries")
    corrupt = masked_lm(tokenizer) if t.objective == "masked_lm" else None
    splits = _splits(cfg, comps, raw, shards, tokenizer, bad)

    train_parts, eval_parts, stats = [], [], {"source": d.source, "packing": d.packing, "tokenizer": tokenizer.id}
    for k, comp in enumerate(comps):
        store, held = splits[comp.name]
        if t.objective == "seq2seq" and comp.format == "chat":
            raise ConfigError(f"{comp.key}.format", "seq2seq pairs come from text or prompt_completion records")
        rows = _rows_or_none(store, cfg, tokenizer.pad_id, comp.format, comp.task)
        if rows is None:
            raise ConfigError(f"{comp.key}.path", f"too little data for one row of {t.seq_len + 1} tokens")
        part = grain.MapDataset.source(rows)
        if d.shuffle:
            part = part.shuffle(seed=t.seed + k)  # grain reshuffles every epoch of the repeat below
        train_parts.append(part.repeat(None))
        eval_rows = _rows_or_none(held, cfg, tokenizer.pad_id, comp.format, comp.task)
        if eval_rows is not None:
            eval_parts.append(grain.MapDataset.source(eval_rows))
        stats[f"{comp.name}.documents"] = len(store)
        stats[f"{comp.name}.tokens"] = int(store.lengths.sum())
        stats[f"{comp.name}.eval_tokens"] = int(held.lengths.sum())
        stats[f"{comp.name}.rows_per_epoch"] = len(rows)
        stats[f"{comp.name}.packed_efficiency"] = round(rows.efficiency, 4)
    weights = [c.weight for c in comps]
    ds = train_parts[0] if len(comps) == 1 else grain.MapDataset.mix(train_parts, weights)
    if corrupt is not None:  # seeded by the row's global index: the same on every process, and on resume
        ds = ds.random_map(corrupt, seed=t.seed)
    ds = ds[process_index::process_count].batch(local_batch, drop_remainder=True)
    eval_source = None
    if len(eval_parts) == len(comps):
        eval_source = eval_parts[0] if len(comps) == 1 else grain.MapDataset.mix(eval_parts, weights)
        if corrupt is not None:
            eval_source = eval_source.random_map(corrupt, seed=t.seed)
    else:
        log.warning("too little held-out data for one row of %d tokens: no evaluation", t.seq_len + 1)

    if len(comps) > 1:
        stats["mixture.realised"] = realised_proportions(comps, t.steps * t.batch_size)
    if bad.total:
        stats["bad_records"] = bad.report()
        log.warning("skipped %d bad records: %s", bad.total, dict(bad.counts))
    if len(comps) == 1 and isinstance(getattr(store, "store", None), MemoryStore):
        gather = (lambda s: np.concatenate([s.get(i)[0] for i in range(len(s))]) if len(s) else np.zeros(0, int))
        train_tokens, eval_tokens = gather(store), gather(held)
        stats["train_tokens"], stats["eval_tokens"] = len(train_tokens), len(eval_tokens)
        if len(eval_tokens):
            stats["unigram_eval_loss"] = unigram_cross_entropy(train_tokens, eval_tokens, cfg.model.vocab_size)
    log.info("data: %s", jsonio.dumps(stats))
    if process_index == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "data_stats.json").write_text(jsonio.dumps(stats, indent=1))
    return TrainData(tokenizer, _iterator(ds, cfg), eval_source, local_batch, process_index, process_count, stats)

