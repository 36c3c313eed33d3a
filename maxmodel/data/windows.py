"""Concatenate-and-split: documents joined into one token stream, cut into fixed windows.

Each window carries segment ids (one per document inside it), positions that restart per document, and a
loss mask that is zero where the target belongs to the next document, so packed documents never see or
predict each other.
"""
from __future__ import annotations

import numpy as np


def token_stream(docs_tokens: list[list[int]], bos_id: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, document index per token) for [bos] + doc + [eos] per document."""
    pieces = [np.asarray([bos_id, *toks, eos_id], np.int32) for toks in docs_tokens]
    doc_ids = [np.full(len(p), i, np.int32) for i, p in enumerate(pieces)]
    return np.concatenate(pieces), np.concatenate(doc_ids)


def positions_from_segments(segments: np.ndarray) -> np.ndarray:
    """Index of each token within its segment: 0 at every segment start."""
    idx = np.arange(segments.shape[-1])
    starts = np.concatenate([[True], segments[1:] != segments[:-1]])
    return (idx - np.maximum.accumulate(np.where(starts, idx, 0))).astype(np.int32)


class WindowSource:
    """Random-access source (grain protocol: __len__, __getitem__) of training windows."""

    def __init__(self, tokens: np.ndarray, doc_ids: np.ndarray, seq_len: int):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"the corpus has {len(tokens)} tokens, fewer than one window of seq_len+1={seq_len + 1}")
        self.tokens, self.doc_ids, self.seq_len = tokens, doc_ids, seq_len
        self.num_windows = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start = int(i) * self.seq_len
        toks = self.tokens[start:start + self.seq_len + 1]
        docs = self.doc_ids[start:start + self.seq_len + 1]
        segments = (docs[:-1] - docs[0] + 1).astype(np.int32)
        return {
            "inputs": toks[:-1], "targets": toks[1:], "segment_ids": segments,
            "positions": positions_from_segments(segments),
            "loss_mask": (docs[1:] == docs[:-1]).astype(np.float32),
        }


class SyntheticSource:
    """Seeded random tokens at the model's vocabulary: for benchmarks (no tokenizer, no I/O). With `seq2seq`,
    rows also carry a random source (encoder_inputs, one segment per row)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int, size: int = 1 << 30, seq2seq: bool = False):
        self.vocab_size, self.seq_len, self.seed, self.size = vocab_size, seq_len, seed, size
        self.seq2seq = seq2seq

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(i)])
        toks = rng.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int32)
        ones = np.ones(self.seq_len, np.int32)
        positions = np.arange(self.seq_len, dtype=np.int32)
        row = {"inputs": toks[:-1], "targets": toks[1:], "segment_ids": ones, "positions": positions,
               "loss_mask": ones.astype(np.float32)}
        if self.seq2seq:
            row.update(encoder_inputs=rng.integers(0, self.vocab_size, self.seq_len, dtype=np.int32),
                       encoder_segment_ids=ones, encoder_positions=positions)
        return row
