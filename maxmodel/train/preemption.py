"""Preemption notices for the loop: Ctrl-C (SIGINT) on this process, and SIGTERM through
`distributed.preemption_requested`, which makes every process see it at the same step.

The loop asks `requested(step)` after every step, on every process; when it is True the loop writes a
checkpoint, waits for it to commit and exits with code 3.
"""
from __future__ import annotations

import logging
import signal

from maxmodel import distributed

log = logging.getLogger("maxmodel.train")


class PreemptionWatch:
    """Context manager: SIGINT sets a flag while it is active; SIGTERM is `distributed`'s (JAX's preemption
    sync point when the distributed runtime is up, so hosts never checkpoint at different steps)."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        # Before the first step, not at its end: a SIGTERM while compiling must still end in a checkpoint.
        distributed.watch_sigterm()
        try:
            self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            pass
        return self

    def _handle(self, signum, _frame):
        self.signal = signum

    def requested(self, step: int) -> bool:
        if distributed.preemption_requested(step) and self.signal is None:
            self.signal = signal.SIGTERM
        if self.signal is not None:
            log.warning("signal %d: checkpointing at step %d, then exiting", self.signal, step)
        return self.signal is not None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
