"""Goodput: where a run's wall time went. Productive steps vs compile, data wait, evaluation, checkpoints and
restart (set-up and restore before the first step).

Time is split by laps: `lap(category)` gives everything since the previous lap to that category, so the
categories cover the whole wall time and add up to 100% by construction. Steps run asynchronously: device
time overlapping a later host phase (a data wait, a checkpoint copy) is counted in that phase, which is what
the run actually lost to it.
"""
from __future__ import annotations

import time

CATEGORIES = ("productive", "compile", "data_wait", "eval", "checkpoint", "restart")


class Goodput:
    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.start = self.last = clock()
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)

    def lap(self, category: str) -> None:
        """Attribute the time since the previous lap to `category`."""
        if category not in self.seconds:
            raise ValueError(f"unknown goodput category {category!r}; expected one of {CATEGORIES}")
        now = self.clock()
        self.seconds[category] += now - self.last
        self.last = now

    def fractions(self) -> dict[str, float]:
        """Each category's share of the wall time up to the last lap (they sum to 1)."""
        total = self.last - self.start
        return {k: (v / total if total > 0 else 0.0) for k, v in self.seconds.items()}

    def metrics(self) -> dict[str, float]:
        """Scalars for metrics.jsonl / TensorBoard: `goodput` (the productive share) and `goodput_<category>`."""
        f = self.fractions()
        return {"goodput": f["productive"], **{f"goodput_{k}": v for k, v in f.items()},
                "wall_seconds": self.last - self.start}

    def summary(self) -> str:
        f = self.fractions()
        parts = ", ".join(f"{k} {v:.1%}" for k, v in f.items())
        return f"goodput {f['productive']:.1%} of {self.last - self.start:.1f}s wall time ({parts})"
