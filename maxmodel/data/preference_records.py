"""One preference JSONL record checked and normalised (the record kinds preference.py lists); kept apart from
the packing so that reading sources (sources.py) needs none of it."""
from __future__ import annotations

import numbers

import numpy as np


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


def messages(x, role="user") -> list[dict]:
    if x is None:
        return []
    return x if isinstance(x, list) else [{"role": role, "content": x}]
