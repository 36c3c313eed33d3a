"""OpenAI response shapes: completion and chat choices, their logprobs, stream chunks, usage.

Log-probabilities are the engine's: of the RAW model distribution (before penalties, temperature and
top-k/top-p/min-p filters), as vLLM returns by default. A completion's `top_logprobs` entry maps token
strings to log-probabilities of the `logprobs` most likely tokens plus the chosen one (so up to
logprobs + 1 entries, as OpenAI documents); tokens whose strings coincide keep the first (best) value.
"""
from __future__ import annotations

import functools
import json
import time
import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(obj) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class Tokens:
    """Token id -> its text for logprobs (tokenizer.decode of the single id, cached)."""

    def __init__(self, tokenizer):
        self.text = functools.lru_cache(maxsize=1 << 16)(lambda i: tokenizer.decode([i]))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(id_: str, obj: str, model: str, choices: list, created: int | None = None, **extra) -> dict:
    return {"id": id_, "object": obj, "created": int(created or time.time()), "model": model,
            "choices": choices, **extra}


# ---------------------------------------------------------------- completions

def completion_logprobs(tokens: Tokens, ids, lps, tops, offset: int = 0) -> dict:
    """{tokens, token_logprobs, top_logprobs, text_offset} for token `ids` with their logprobs `lps` (None
    for an echoed prompt's first token) and alternatives `tops` ([(id, lp)] or None per token)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, lp, top in zip(ids, lps, tops):
        s = tokens.text(int(i))
        out["tokens"].append(s)
        out["token_logprobs"].append(lp)
        if lp is None:
            out["top_logprobs"].append(None)
        else:
            entry = {}
            for alt, alt_lp in top or ():
                entry.setdefault(tokens.text(int(alt)), alt_lp)
            entry.setdefault(s, lp)
            out["top_logprobs"].append(entry)
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def completion_choice(tokens: Tokens, index: int, comp, result, prompt_text: str, echo: bool,
                      want_logprobs: bool) -> dict:
    """One choice of a finished request: `comp` a CompletionOutput, `result` its RequestOutput."""
    text = (prompt_text + comp.text) if echo else comp.text
    logprobs = None
    if want_logprobs:
        ids, lps = list(comp.token_ids), list(comp.logprobs)
        tops = list(comp.top_logprobs or [None] * len(ids))
        if echo:
            n = len(result.prompt_ids)
            ids = list(result.prompt_ids) + ids
            lps = list(result.prompt_logprobs or [None] * n) + lps
            tops = list(result.prompt_top_logprobs or [None] * n) + tops
        logprobs = completion_logprobs(tokens, ids, lps, tops)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": comp.finish_reason}


def completion_chunk_choice(tokens: Tokens, index: int, ev, want_logprobs: bool, offset: int) -> dict:
    logprobs = None
    if want_logprobs and ev.token_id is not None:
        logprobs = completion_logprobs(tokens, [ev.token_id], [ev.logprob], [ev.top_logprobs], offset)
    return {"index": index, "text": ev.text, "logprobs": logprobs, "finish_reason": ev.finish_reason}


# ---------------------------------------------------------------- chat

def _chat_token(tokens: Tokens, token_id: int, lp: float) -> dict:
    s = tokens.text(int(token_id))
    return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}


def chat_logprobs(tokens: Tokens, ids, lps, tops) -> dict:
    content = []
    for i, lp, top in zip(ids, lps, tops):
        entry = _chat_token(tokens, i, lp)
        entry["top_logprobs"] = [_chat_token(tokens, a, alp) for a, alp in (top or ())]
        content.append(entry)
    return {"content": content, "refusal": None}


def chat_choice(tokens: Tokens, index: int, comp, want_logprobs: bool) -> dict:
    logprobs = None
    if want_logprobs:
        logprobs = chat_logprobs(tokens, comp.token_ids, comp.logprobs,
                                 comp.top_logprobs or [None] * len(comp.token_ids))
    return {"index": index, "message": {"role": "assistant", "content": comp.text, "refusal": None},
            "logprobs": logprobs, "finish_reason": comp.finish_reason}


def chat_chunk_choice(tokens: Tokens, index: int, ev, want_logprobs: bool) -> dict:
    logprobs = None
    if want_logprobs and ev.token_id is not None:
        logprobs = chat_logprobs(tokens, [ev.token_id], [ev.logprob], [ev.top_logprobs])
    delta = {"content": ev.text} if ev.text else {}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": ev.finish_reason}


def chat_role_choice(index: int) -> dict:
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
