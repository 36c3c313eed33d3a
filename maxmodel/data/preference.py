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

import numbers

import numpy as np

from .packing import IndexedStore, first_fit, row_layout
from .sources import DataError
from .supervised import encode_document

KINDS = {"pair": ("chosen", "rejected"), "ranked": ("responses",), "unpaired": ("completion", "label"),
         "scored": ("response", "score")}
# the kinds each objective reads (kto takes a pair as a desirable and an undesirable example)
ACCEPTS = {"reward": ("pair", "ranked", "scored"), "kto": ("unpaired", "pair")}
PAIRWISE = ("pair",)


def _is_messages(x) -> bool:
    return isinstance(x, list) and bool(x) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in x)


def take_record(record: dict, where: str, bad) -> dict | None:
    """The normalised record {kind, prompt, responses, value, where}, or None after reporting it."""
    kind = next((k for k, fields in KINDS.items() if all(f in record for f in fields)), None)
    if kind is None:
        bad(where, "not a preference record: expected fields prompt + chosen/rejected, responses, "
                   "completion/label or response/score", "not a preference record")
        return None
    prompt = record.get("prompt")
    responses = {"pair": lambda: [record["chosen"], record["rejected"]], "ranked": lambda: record["responses"],
                 "unpaired": lambda: [record["completion"]], "scored": lambda: [record["response"]]}[kind]()
    if not isinstance(responses, list) or len(responses) < (2 if kind == "ranked" else 1):
        bad(where, "'responses' must list at least two responses, best first", "bad responses")
        return None
    chat = _is_messages(prompt) or any(isinstance(r, list) for r in responses)
    if prompt is None and not chat:
        bad(where, "missing field 'prompt'", "missing field 'prompt'")
        return None
    ok_prompt = prompt is None or isinstance(prompt, str) or _is_messages(prompt)
    ok_responses = all((isinstance(r, str) and r.strip()) or _is_messages(r) for r in responses)
    if not (ok_prompt and ok_responses):
        bad(where, "prompt and responses must be non-empty strings or lists of {role, content} messages",
            "not a string")
        return None
    value = 0.0
    if kind == "unpaired":
        if not isinstance(record["label"], bool):
            bad(where, f"'label' must be true or false, got {record['label']!r}", "bad label")
            return None
        value = float(record["label"])
    if kind == "scored":
        score = record["score"]
        if isinstance(score, bool) or not isinstance(score, numbers.Real) or not np.isfinite(score):
            bad(where, f"'score' must be a finite number, got {score!r}", "bad score")
            return None
        value = float(score)
    return {"kind": kind, "prompt": prompt, "responses": responses, "chat": chat, "value": value, "where": where}


def _messages(x, role="user") -> list[dict]:
    if x is None:
        return []
    return x if isinstance(x, list) else [{"role": role, "content": x}]


def encode_response(doc: dict, response, tokenizer, chat_template: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, weights) of the record's prompt followed by one response; only the response counts."""
    if not doc["chat"]:
        return encode_document({"prompt": doc["prompt"], "completion": response}, "prompt_completion", tokenizer)
    prompt = _messages(doc["prompt"])
    tokens, weights = encode_document({"messages": prompt + _messages(response, "assistant")}, "chat",
                                      tokenizer, chat_template)
    if any(m["role"] == "assistant" for m in prompt):  # earlier assistant turns are context, not the response
        head, _ = encode_document({"messages": prompt}, "chat", tokenizer, chat_template)
        n = min(len(head), len(tokens))
        same = np.flatnonzero(head[:n] != tokens[:n])
        weights = weights.copy()
        weights[:same[0] if len(same) else n - 1] = 0
    return tokens, weights


def record_text(doc: dict, chat_template: str, tokenizer_path: str = "") -> str:
    """What a tokenizer trained on this data should see: the prompt and every response."""
    from .supervised import document_text
    if not doc["chat"]:
        return "".join([doc["prompt"], *doc["responses"]])
    return "".join(document_text({"messages": _messages(doc["prompt"]) + _messages(r, "assistant")}, "chat",
                                 chat_template, tokenizer_path) for r in doc["responses"])


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
