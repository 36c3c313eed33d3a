"""Preference data (`data.format=preference`): JSONL records -> groups of documents -> packed rows.

One JSONL record is one of (the kind is told by its fields):
- a pair: {"prompt", "chosen", "rejected"}; prompt and responses are strings, or chat messages (lists of
  {role, content}; a string response in a chat record is one assistant message; "prompt" may be left out when
  "chosen" and "rejected" are whole conversations);
- a ranked list: {"prompt", "responses": [best, ..., worst]} (reward models: Plackett-Luce);
- an unpaired example: {"prompt", "completion", "label": true (desirable) | false} (KTO);
- a scored response: {"prompt", "response", "score": number} (reward models: regression).
Each response becomes a document as supervised.py encodes it (BOS + prompt + response + EOS, the loss mask
on the response; chats rendered with `data.chat_template`, the model's own Jinja template included), and a
record's documents form one *group* that is never split: a pair is packed with both sides in the same row,
chosen first. Rows are filled first-fit with at most `dpo.max_docs` documents, each its own segment (no
document attends to another); per row, `pref_group` numbers its groups (1, 2, ...; 0 on padding) and
`pref_value` carries each document's label or score, so the loss reads per-document sums from the
segment ids alone. KTO groups are (example, mismatched example): the record's prompt with the next
record's response, whose log-ratio estimates the KL reference point. A record that does not fit in a row,
or whose kind the objective cannot use, is a bad record (file:line named; counted with on_bad_record=skip).
"""
from __future__ import annotations

import numpy as np

from .packing import IndexedStore, first_fit, row_layout
from .preference_records import ACCEPTS, PAIRWISE, messages
from .sources import DataError
from .supervised import encode_document

def encode_response(doc: dict, response, tokenizer, chat_template: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, weights) of the record's prompt followed by one response; only the response counts."""
    if not doc["chat"]:
        return encode_document({"prompt": doc["prompt"], "completion": response}, "prompt_completion", tokenizer)
    prompt = messages(doc["prompt"])
    tokens, weights = encode_document({"messages": prompt + messages(response, "assistant")}, "chat",
                                      tokenizer, chat_template)
    if any(m["role"] == "assistant" for m in prompt):  # earlier assistant turns are context, not the response
        head, _ = encode_document({"messages": prompt}, "chat", tokenizer, chat_template)
        n = min(len(head), len(tokens))
        same = np.flatnonzero(head[:n] != tokens[:n])
        weights = weights.copy()
        weights[:same[0] if len(same) else n - 1] = 0
    return tokens, weights


class GroupStore:
    """Encoded groups: `lengths` (tokens per group) and `get(i)` (its documents joined, for statistics) as
    every store has, plus `docs(i)` -> [(tokens, weights)] and `values(i)` -> one float per document."""

    def __init__(self, groups: list[list[tuple[np.ndarray, np.ndarray]]], values: list[list[float]]):
        self.groups, self.doc_values = groups, [np.asarray(v, np.float32) for v in values]
        self.lengths = np.fromiter((sum(len(t) for t, _ in g) for g in groups), np.int64, count=len(groups))
        self.predictions = np.fromiter((sum(len(t) - 1 for t, _ in g) for g in groups), np.int64,
                                       count=len(groups))
        self.num_docs = np.fromiter((len(g) for g in groups), np.int64, count=len(groups))

    def __len__(self) -> int:
        return len(self.groups)

    def docs(self, i: int):
        return self.groups[i]

    def values(self, i: int) -> np.ndarray:
        return self.doc_values[i]

    def get(self, i: int):
        g = self.groups[i]
        return np.concatenate([t for t, _ in g]), np.concatenate([w for _, w in g])


def encode_groups(docs: list[dict], objective: str, tokenizer, chat_template: str, seq_len: int, max_docs: int,
                  bad) -> GroupStore:
    """The records as the objective's groups, each checked to fit in one row (bad records reported)."""
    accepts = ACCEPTS.get(objective, PAIRWISE)
    groups, values = [], []
    docs = [d for d in docs if _usable(d, objective, accepts, bad)]
    for i, doc in enumerate(docs):
        try:
            encoded = [encode_response(doc, r, tokenizer, chat_template) for r in doc["responses"]]
        except ValueError as e:  # a chat the template refuses to render
            bad(doc["where"], str(e), "template does not render")
            continue
        vals = [doc["value"]] * len(encoded)
        if objective == "kto":  # (example, the next record's response after this prompt) per response
            other = docs[(i + 1) % len(docs)]["responses"][0]
            mismatched = encode_response(doc, other, tokenizer, chat_template)
            labels = [doc["value"]] if doc["kind"] == "unpaired" else [1.0, 0.0]
            units = [([e, mismatched], [v, -1.0]) for e, v in zip(encoded, labels)]
        else:
            units = [(encoded, vals)]
        need = [(sum(len(t) - 1 for t, _ in unit), len(unit)) for unit, _ in units]
        predictions, n = max(need)
        if predictions > seq_len or max(k for _, k in need) > max_docs:
            bad(doc["where"], f"its {n} documents need {predictions} positions, more than one row holds "
                              f"(train.seq_len={seq_len}, dpo.max_docs={max_docs})", "does not fit in a row")
            continue
        for unit, v in units:  # a record's units are kept together or not at all
            groups.append(unit)
            values.append(v)
    if docs and not groups:
        raise DataError(f"{docs[0]['where'].rsplit(':', 1)[0]}: no preference record fits one row of "
                        f"train.seq_len={seq_len} ({bad.total} skipped as bad)")
    return GroupStore(groups, values)


def _usable(doc: dict, objective: str, accepts, bad) -> bool:
    if doc["kind"] == "ranked" and len(doc["responses"]) == 2 and "ranked" not in accepts:
        doc["kind"] = "pair"  # a ranked list of two is a pair
    if doc["kind"] not in accepts:
        bad(doc["where"], f"a {doc['kind']} record, which train.objective={objective} does not read "
                          f"(it reads {' or '.join(accepts)} records)", f"{doc['kind']} record")
        return False
    return True


class PreferenceRows:
    """Random-access rows of a GroupStore (or a split of one): groups placed first-fit by their positions
    and documents (`packing=none`: one group per row), the plan made from lengths up front."""

    def __init__(self, store, seq_len: int, pad_id: int, packing: str = "first_fit", max_docs: int = 16,
                 open_rows: int = 64):
        self.store, self.ids = (store.store, store.ids) if isinstance(store, IndexedStore) else (
            store, np.arange(len(store)))
        self.seq_len, self.pad_id, self.max_docs = seq_len, pad_id, max_docs
        if not len(self.ids):
            raise ValueError("no preference group")
        size, count = self.store.predictions[self.ids], self.store.num_docs[self.ids]
        row = np.arange(len(size)) if packing == "none" else first_fit(size, seq_len, open_rows, count, max_docs)
        order, self.row_offsets = row_layout(row)
        self.order = self.ids[order]
        self.num_rows = len(self.row_offsets) - 1
        self.efficiency = float(size.sum() / (self.num_rows * seq_len))

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        L = self.seq_len
        row = {k: np.full(L, self.pad_id, np.int32) for k in ("inputs", "targets")}
        for k in ("segment_ids", "positions", "pref_group"):
            row[k] = np.zeros(L, np.int32)
        row["loss_mask"], row["pref_value"] = np.zeros(L, np.float32), np.zeros(L, np.float32)
        at, segment = 0, 0
        for group, g in enumerate(self.order[self.row_offsets[i]:self.row_offsets[i + 1]], start=1):
            for (tokens, weights), value in zip(self.store.docs(int(g)), self.store.values(int(g))):
                k = len(tokens) - 1
                segment += 1
                span = slice(at, at + k)
                row["inputs"][span], row["targets"][span] = tokens[:-1], tokens[1:]
                row["loss_mask"][span] = weights[1:] > 0
                row["segment_ids"][span], row["positions"][span] = segment, np.arange(k)
                row["pref_group"][span], row["pref_value"][span] = group, value
                at += k
        return row
