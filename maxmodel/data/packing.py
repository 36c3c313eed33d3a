"""Packing documents into rows of `seq_len` predictions, planned from document lengths alone.

A row holds `inputs`, `targets`, `segment_ids` (1, 2, ... per document piece, 0 on padding), `positions`
(restarting at 0 for every piece) and `loss_mask` (the document's weight of each target; 0 across a
document boundary and on padding). The model masks attention to equal segment ids, so no token sees
another document. With `prefix=True` (the prefix-LM objective) a row also holds `prefix_mask`: 1 on the
inputs that belong to their document's prefix, i.e. its leading run of zero-weight tokens (BOS + prompt).
With `virtual=k` (soft prompts, peft.method=prompt) rows also hold `prompt_slots` (1..k on k placeholder
inputs that the model fills with its soft-prompt embeddings, 0 elsewhere) and `task` (the table of each
position). `first_fit` / `none` lead every document piece with its own k slots (pieces are planned k shorter),
so each document of a packed row is conditioned on its prompt, as if alone; `concat` leads each row with k
slots in its first segment (windows are k shorter), so a document starting mid-row has none.

- `concat`: documents joined into one stream (each is BOS ... EOS) and cut into consecutive windows;
  no padding, a document may continue in the next row.
- `first_fit`: documents (cut into pieces of at most seq_len predictions) placed in the first open row
  with room, among the last `open_rows` rows; rows are padded.
- `none`: one document piece per row, padded.

Because the plan is computed from lengths up front, every row is random access: each process reads only
the documents of its own rows, and grain's shuffle and iterator state work on row indices.
"""
from __future__ import annotations

import numpy as np

from .windows import positions_from_segments

PACKINGS = ("concat", "first_fit", "none")


class IndexedStore:
    """A store seen through a list of document indices (a split, or a reordering)."""

    def __init__(self, store, ids: np.ndarray):
        self.store, self.ids = store, np.asarray(ids, np.int64)
        self.lengths = store.lengths[self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, i: int):
        return self.store.get(int(self.ids[i]))


def with_row_slots(row: dict[str, np.ndarray], k: int, task: int, pad_id: int) -> dict[str, np.ndarray]:
    """A row of L - k predictions led by k soft-prompt slots in its first segment (ConcatRows)."""
    lead = {"inputs": np.full(k, pad_id, np.int32), "targets": np.full(k, pad_id, np.int32),
            "segment_ids": np.full(k, row["segment_ids"][0], np.int32), "loss_mask": np.zeros(k, np.float32)}
    out = {key: np.concatenate([lead[key], row[key]]) for key in lead}
    out["positions"] = positions_from_segments(out["segment_ids"])
    out["prompt_slots"] = np.concatenate([np.arange(1, k + 1), np.zeros(len(row["inputs"]), int)]).astype(np.int32)
    out["task"] = np.full(len(out["inputs"]), task, np.int32)
    return out


def prefix_length(weights: np.ndarray) -> int:
    """Tokens in a document's prefix: those before its first counted target."""
    counted = np.flatnonzero(weights > 0)
    return int(counted[0]) if len(counted) else len(weights)


class ConcatRows:
    """Window i is stream tokens [i*L, i*L + L + 1): inputs are the first L, targets the last L."""

    def __init__(self, store, seq_len: int, prefix: bool = False, virtual: int = 0, task: int = 0):
        self.virtual, self.task = virtual, task
        seq_len -= virtual
        self.store, self.seq_len, self.prefix = store, seq_len, prefix
        self.offsets = np.concatenate([[0], np.cumsum(store.lengths)])
        total = int(self.offsets[-1])
        if total < seq_len + 1:
            raise ValueError(f"the data has {total} tokens, fewer than one row of seq_len+1={seq_len + 1}")
        self.num_rows = (total - 1) // seq_len
        self.efficiency = 1.0  # no padding; the tail shorter than one row is dropped

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start, stop = int(i) * self.seq_len, int(i) * self.seq_len + self.seq_len + 1
        first = int(np.searchsorted(self.offsets, start, side="right") - 1)
        last = int(np.searchsorted(self.offsets, stop, side="left"))
        toks, weights, docs, in_prefix = [], [], [], []
        for d in range(first, last):
            t, w = self.store.get(d)
            a = max(start - int(self.offsets[d]), 0)
            b = min(stop - int(self.offsets[d]), len(t))
            toks.append(t[a:b])
            weights.append(w[a:b])
            docs.append(np.full(b - a, d, np.int64))
            in_prefix.append(np.arange(a, b) < prefix_length(w) if self.prefix else None)
        toks, weights, docs = np.concatenate(toks), np.concatenate(weights), np.concatenate(docs)
        segments = (docs[:-1] - docs[0] + 1).astype(np.int32)
        row = {"inputs": toks[:-1].astype(np.int32), "targets": toks[1:].astype(np.int32), "segment_ids": segments,
               "positions": positions_from_segments(segments),
               "loss_mask": ((docs[1:] == docs[:-1]) & (weights[1:] > 0)).astype(np.float32)}
        if self.prefix:
            row["prefix_mask"] = np.concatenate(in_prefix)[:-1].astype(np.int32)
        return with_row_slots(row, self.virtual, self.task, 0) if self.virtual else row


def document_pieces(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc, start, predictions) of every piece: a document of n tokens makes n-1 predictions, cut into
    pieces of at most seq_len; piece k covers tokens [k*seq_len, k*seq_len + predictions + 1)."""
    slots = np.maximum(np.asarray(lengths, np.int64) - 1, 0)
    per_doc = -(-slots // seq_len)
    doc = np.repeat(np.arange(len(slots)), per_doc)
    first_piece = np.concatenate([[0], np.cumsum(per_doc)])[:-1]
    k = np.arange(len(doc)) - np.repeat(first_piece, per_doc)
    start = k * seq_len
    return doc, start, np.minimum(slots[doc] - start, seq_len)


def first_fit(sizes: np.ndarray, capacity: int, open_rows: int, counts: np.ndarray | None = None,
              max_count: int = 0) -> np.ndarray:
    """Row of each item: the first open row with room, else a new row (closing the oldest open row once
    `open_rows` are open). Rows are numbered in the order they were opened. With `counts`, a row also holds
    at most `max_count` of them (preference groups: documents per row)."""
    rows = np.empty(len(sizes), np.int64)
    open_ids: list[int] = []
    space: list[int] = []
    room: list[int] = []
    next_row = 0
    counts = np.zeros(len(sizes), np.int64) if counts is None else np.asarray(counts)
    for i, (size, count) in enumerate(zip(np.asarray(sizes).tolist(), counts.tolist())):
        j = next((j for j, s in enumerate(space) if s >= size and room[j] >= count), -1)
        if j < 0:
            if len(open_ids) == open_rows:
                del open_ids[0], space[0], room[0]
            open_ids.append(next_row)
            space.append(capacity)
            room.append(max_count if max_count else count)
            next_row += 1
            j = len(space) - 1
        rows[i] = open_ids[j]
        space[j] -= size
        room[j] -= count
        if space[j] == 0 or (max_count and room[j] == 0):
            del open_ids[j], space[j], room[j]
    return rows


def row_layout(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, row_offsets) of a row assignment: items sorted by row, each row's items in the order they were
    placed; row r holds order[row_offsets[r]:row_offsets[r + 1]]."""
    order = np.argsort(row, kind="stable")
    return order, np.concatenate([[0], np.cumsum(np.bincount(row, minlength=row.max() + 1))])


class PackedRows:
    """`first_fit` or `none` packing of a store's documents into padded rows."""

    def __init__(self, store, seq_len: int, pad_id: int, packing: str = "first_fit", open_rows: int = 64,
                 prefix: bool = False, virtual: int = 0, task: int = 0):
        self.virtual, self.task = virtual, task
        self.store, self.seq_len, self.pad_id, self.prefix = store, seq_len, pad_id, prefix
        doc, start, size = document_pieces(store.lengths, seq_len - virtual)
        size_in_row = size + virtual
        if not len(doc):
            raise ValueError("no document has a token to predict")
        row = first_fit(size_in_row, seq_len, open_rows) if packing == "first_fit" else np.arange(len(doc))
        order, self.row_offsets = row_layout(row)
        self.doc, self.start, self.size = doc[order], start[order], size[order]
        self.num_rows = len(self.row_offsets) - 1
        self.efficiency = float(size.sum() / (self.num_rows * seq_len))

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        L = self.seq_len
        inputs = np.full(L, self.pad_id, np.int32)
        targets = np.full(L, self.pad_id, np.int32)
        segments, positions = np.zeros(L, np.int32), np.zeros(L, np.int32)
        loss = np.zeros(L, np.float32)
        in_prefix = np.zeros(L, np.int32)
        slots = np.zeros(L, np.int32)
        at = 0
        for j in range(self.row_offsets[i], self.row_offsets[i + 1]):
            t, w = self.store.get(int(self.doc[j]))
            s, k = int(self.start[j]), int(self.size[j])
            seg = j - self.row_offsets[i] + 1
            if self.virtual:  # the piece's own soft-prompt slots: positions 0..v-1, no targets
                v = self.virtual
                slots[at:at + v], segments[at:at + v], positions[at:at + v] = np.arange(1, v + 1), seg, np.arange(v)
                at += v
            inputs[at:at + k] = t[s:s + k]
            targets[at:at + k] = t[s + 1:s + k + 1]
            loss[at:at + k] = w[s + 1:s + k + 1] > 0
            segments[at:at + k] = seg
            positions[at:at + k] = np.arange(k) + self.virtual
            if self.prefix:
                in_prefix[at:at + k] = np.arange(s, s + k) < prefix_length(w)
            at += k
        row = {"inputs": inputs, "targets": targets, "segment_ids": segments, "positions": positions,
               "loss_mask": loss}
        if self.prefix:
            row["prefix_mask"] = in_prefix
        if self.virtual:
            row |= {"prompt_slots": slots, "task": np.full(L, self.task, np.int32)}
        return row


def make_rows(store, seq_len: int, pad_id: int, packing: str, prefix: bool = False, virtual: int = 0,
              task: int = 0):
    """Rows of a store's documents; with `prefix`, each row also marks its documents' prefixes; with
    `virtual`, each document starts with that many soft-prompt slots of table `task`."""
    if packing == "concat":
        return ConcatRows(store, seq_len, prefix, virtual, task)
    return PackedRows(store, seq_len, pad_id, packing, prefix=prefix, virtual=virtual, task=task)
