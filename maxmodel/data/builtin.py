"""The built-in corpus: the English documentation text that ships with Python (`pydoc_data.topics`).

No download: about 465 KB of prose and code samples, 80-odd documents, always present with CPython.
"""
from __future__ import annotations


def builtin_documents(piece_chars: int = 2000) -> list[str]:
    """The topics in a fixed order (sorted by name), cut at paragraph breaks into pieces of about
    `piece_chars`: topics range from 100 bytes to 50 KB, and even pieces make a held-out split of ~5%."""
    from pydoc_data.topics import topics
    pieces = []
    for name in sorted(topics):
        current = ""
        for paragraph in topics[name].strip().split("\n\n"):
            current = f"{current}\n\n{paragraph}" if current else paragraph
            if len(current) >= piece_chars:
                pieces.append(current)
                current = ""
        if current.strip():
            pieces.append(current)
    return pieces


def split_documents(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out every k-th document for evaluation, so both splits sample the whole manual."""
    every = max(2, round(1 / eval_fraction))
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    held_out = [d for i, d in enumerate(docs) if i % every == every - 1]
    return train, held_out
