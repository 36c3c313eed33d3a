"""Sequence-to-sequence rows: (source, target) pairs, several packed into each row with both sides aligned.

A pair comes from one document of a store (tokens BOS ... EOS with per-token weights, see supervised.py):
- `prompt_completion`: the prompt is the source and the completion the target (each cut to seq_len - 1
  tokens if longer);
- `text`: the document body is cut into chunks of 2·span tokens, span = seq_len // 2 - 1; the first half of a
  chunk is the source and the second half, its continuation, the target (a shorter last chunk is split in
  half; a one-token remainder is dropped). Both sides of a full chunk take exactly half a row.
The encoder side is source + EOS; the decoder reads BOS + target and predicts target + EOS, and every target
token counts in the loss. Pair k of a row is segment k on both sides (0 = padding).

A row holds the decoder keys of packing.py (inputs, targets, segment_ids, positions, loss_mask) plus
encoder_inputs, encoder_segment_ids and encoder_positions. The packing plan is computed up front (from the
document lengths for text; prompt_completion reads each document's weights once), so rows are random access
and grain's shuffle and iterator state work on row indices as for decoder-only rows.
"""
from __future__ import annotations

import numpy as np

OPEN_ROWS = {"concat": 1, "first_fit": 64}  # concat keeps pairs in order; none puts one pair per row


def text_pairs(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """[n, 5] (doc, source start, source length, target start, target length) for plain-text documents."""
    span = max(1, seq_len // 2 - 1)
    body = np.maximum(np.asarray(lengths, np.int64) - 2, 0)  # without BOS and EOS
    per_doc = -(-body // (2 * span))
    doc = np.repeat(np.arange(len(body)), per_doc)
    first_chunk = np.concatenate([[0], np.cumsum(per_doc)])[:-1]
    offset = (np.arange(len(doc)) - np.repeat(first_chunk, per_doc)) * 2 * span
    size = np.minimum(body[doc] - offset, 2 * span)
    src_len = size - size // 2
    pairs = np.stack([doc, 1 + offset, src_len, 1 + offset + src_len, size // 2], axis=1)
    return pairs[pairs[:, 4] > 0]


def prompt_completion_pairs(store, seq_len: int) -> np.ndarray:
    """[n, 5] pairs of prompt_completion documents: the source is the unweighted prompt after BOS, the target
    the weighted completion before EOS."""
    out = []
    for d in range(len(store)):
        tokens, weights = store.get(d)
        k = 1 + int(np.argmax(weights[1:] > 0)) if (weights[1:] > 0).any() else len(tokens) - 1
        src_len, tgt_len = min(k - 1, seq_len - 1), min(len(tokens) - 1 - k, seq_len - 1)
        out.append((d, 1, src_len, k, max(tgt_len, 0)))
    return np.asarray(out, np.int64).reshape(-1, 5)


def first_fit_pairs(enc: np.ndarray, dec: np.ndarray, capacity: int, open_rows: int) -> np.ndarray:
    """packing.first_fit with two capacities: a pair goes to the first open row where both its source and
    its target fit."""
    rows = np.empty(len(enc), np.int64)
    open_ids: list[int] = []
    space: list[list[int]] = []
    next_row = 0
    for i, (e, d) in enumerate(zip(enc.tolist(), dec.tolist())):
        j = next((j for j, (se, sd) in enumerate(space) if se >= e and sd >= d), -1)
        if j < 0:
            if len(open_ids) == open_rows:
                del open_ids[0], space[0]
            open_ids.append(next_row)
            space.append([capacity, capacity])
            next_row += 1
            j = len(space) - 1
        rows[i] = open_ids[j]
        space[j][0] -= e
        space[j][1] -= d
        if not (space[j][0] and space[j][1]):  # every pair needs at least one slot on each side
            del open_ids[j], space[j]
    return rows


class Seq2SeqRows:
    """Random-access packed seq2seq rows of a store's documents."""

    def __init__(self, store, seq_len: int, pad_id: int, packing: str = "concat", fmt: str = "text"):
        self.store, self.seq_len, self.pad_id = store, seq_len, pad_id
        pairs = text_pairs(store.lengths, seq_len) if fmt == "text" else prompt_completion_pairs(store, seq_len)
        if not len(pairs):
            raise ValueError("no document makes a (source, target) pair")
        enc, dec = pairs[:, 2] + 1, pairs[:, 4] + 1  # + EOS; BOS + target (inputs) / target + EOS (targets)
        if packing == "none":
            row = np.arange(len(pairs))
        else:
            row = first_fit_pairs(enc, dec, seq_len, OPEN_ROWS[packing])
        order = np.argsort(row, kind="stable")  # pairs of a row stay in the order they were placed
        self.pairs = pairs[order]
        self.row_offsets = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=row.max() + 1))])
        self.num_rows = len(self.row_offsets) - 1
        self.efficiency = float((enc.sum() + dec.sum()) / (2 * self.num_rows * seq_len))

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        L = self.seq_len
        row = {k: np.full(L, self.pad_id, np.int32) for k in ("inputs", "targets", "encoder_inputs")}
        for k in ("segment_ids", "positions", "encoder_segment_ids", "encoder_positions"):
            row[k] = np.zeros(L, np.int32)
        row["loss_mask"] = np.zeros(L, np.float32)
        at_enc = at_dec = 0
        for seg, j in enumerate(range(self.row_offsets[i], self.row_offsets[i + 1]), start=1):
            doc, src_start, src_len, tgt_start, tgt_len = (int(v) for v in self.pairs[j])
            tokens, _ = self.store.get(doc)
            bos, eos = tokens[0], tokens[-1]  # every stored document is BOS ... EOS (supervised.py)
            source = np.append(tokens[src_start:src_start + src_len], eos)
            target = np.concatenate([[bos], tokens[tgt_start:tgt_start + tgt_len], [eos]])
            e, d = len(source), len(target) - 1
            row["encoder_inputs"][at_enc:at_enc + e] = source
            row["encoder_segment_ids"][at_enc:at_enc + e] = seg
            row["encoder_positions"][at_enc:at_enc + e] = np.arange(e)
            row["inputs"][at_dec:at_dec + d] = target[:-1]
            row["targets"][at_dec:at_dec + d] = target[1:]
            row["segment_ids"][at_dec:at_dec + d] = seg
            row["positions"][at_dec:at_dec + d] = np.arange(d)
            row["loss_mask"][at_dec:at_dec + d] = 1.0
            at_enc, at_dec = at_enc + e, at_dec + d
        return row
