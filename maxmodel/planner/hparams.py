"""Batch size and learning rate for a compute budget, and the schedule around them.

DeepSeek LLM (Bi et al. 2024, Section 3.1, Figure 3): B_opt = 0.2920·C^0.3271 tokens and
eta_opt = 0.3118·C^-0.1250, fitted on their IsoFLOP runs (AdamW, multi-step schedule) for C from 1e17 to
3e20; we use them as a starting point with a cosine schedule that ends at 10% of the peak and lasts exactly
the planned steps, as Hoffmann et al. 2022 (Section 3.1, Appendix B) found best.
"""
from __future__ import annotations

import math


def batch_tokens(flops: float) -> float:
    return 0.2920 * flops ** 0.3271


def learning_rate(flops: float) -> float:
    return 0.3118 * flops ** -0.1250


def batch_sequences(flops: float, seq_len: int, tokens: float, multiple_of: int = 1) -> int:
    """Global batch in sequences: DeepSeek's optimum rounded to a power of two, at most 1/100 of the run (so
    there are at least ~100 steps) and a multiple of the data-parallel width."""
    target = min(batch_tokens(flops), tokens / 100) / seq_len
    seqs = 2 ** max(0, round(math.log2(max(target, 1))))
    return max(multiple_of, -(-seqs // multiple_of) * multiple_of)


def warmup_steps(steps: int) -> int:
    return max(1, min(2000, steps // 50))
