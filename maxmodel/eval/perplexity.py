"""Perplexity and bits per byte of text: files (plain text: one document per file; JSONL: `text_field` per
line) or the built-in corpus's held-out split (the documents training holds out, data.eval_fraction).

Each document is BOS + its tokens; every text token is scored exactly once, by rolling windows: a window
predicts the next `stride` tokens (default: the model's max_length, i.e. disjoint windows) from as much of
the preceding text as fits in max_length, so every prediction has the longest context the windows allow.
All windows of all documents are packed into rows together (scoring.py).
"""
from __future__ import annotations

import math
import re

from maxmodel.config.errors import ConfigError


def windows(tokens: list[int], max_length: int, stride: int = 0) -> list[tuple[list[int], int]]:
    """(sequence, start) pieces that score tokens[1:] once each: targets [a, b) with b - a <= stride, their
    context the max_length - (b - a) tokens before a (all there are, at the document's start)."""
    stride = stride or max_length
    if not 1 <= stride <= max_length:
        raise ConfigError("stride", f"must be in [1, max_length={max_length}], got {stride}")
    out, a = [], 1
    while a < len(tokens):
        b = min(a + stride, len(tokens))
        lo = max(0, b - 1 - max_length)
        out.append((tokens[lo:b], a - lo))
        a = b
    return out


def documents(path, text_field: str, bad, eval_fraction: float) -> list[tuple[str, str]]:
    """(text, where) of each document: `path` a file, glob or list (.jsonl/.jsonl.gz: JSON lines, else
    plain text), or None for the built-in corpus's held-out documents."""
    from maxmodel.data.sources import expand_paths, read_documents
    if path in (None, "", "builtin"):
        from maxmodel.data.builtin import builtin_documents
        from maxmodel.data.pipeline import held_out_split
        docs = builtin_documents()
        return [(docs[i], f"builtin:{i}") for i in held_out_split(len(docs), eval_fraction)[1]]
    out = []
    for file in expand_paths(path, key="perplexity path", bad=bad):
        source = "jsonl" if re.search(r"\.jsonl(\.gz)?$", file) else "text"
        out += list(read_documents(source, None, "text", text_field, bad, files=[file]))
    return out


def perplexity(model, docs: list[tuple[str, str]], stride: int = 0) -> dict:
    """Totals and the usual ratios: token perplexity, bits per byte (tokenizer-independent), byte and word
    perplexity (lm-eval's definitions: UTF-8 bytes, whitespace-separated words)."""
    if not docs:
        raise ConfigError("task", "no documents to score")
    pieces = []
    for text, _ in docs:
        tokens = [model.tokenizer.bos_id, *model.encode(text, bos=False)]
        pieces += windows(tokens, model.max_length, stride)
    scores = model.scorer.score(pieces)
    nll = -sum(s.logprob for s in scores)
    n_tokens = sum(s.tokens for s in scores)
    n_bytes = sum(len(text.encode("utf-8")) for text, _ in docs)
    n_words = sum(len(re.split(r"\s+", text)) for text, _ in docs)
    bpb = nll / (math.log(2) * n_bytes)
    return {"nll": nll, "tokens": n_tokens, "bytes": n_bytes, "words": n_words, "documents": len(docs),
            "windows": len(pieces), "nll_per_token": nll / n_tokens, "token_perplexity": math.exp(nll / n_tokens),
            "bits_per_byte": bpb, "byte_perplexity": 2.0 ** bpb, "word_perplexity": math.exp(nll / n_words)}
