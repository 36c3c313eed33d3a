"""Preemption notices: SIGTERM / SIGINT on this host, and JAX's multi-host preemption sync point.

The loop asks `requested(step)` after every step; when it is True the loop writes a checkpoint, waits for it
to commit and exits with code 3.
"""
from __future__ import annotations

import logging
import signal

import jax

log = logging.getLogger("maxmodel.train")


def _jax_sync_point_available() -> bool:
    """JAX's preemption service runs when jax.distributed is initialised (TPU pods, Slurm, local launcher)."""
    from jax._src import distributed as jax_distributed  # the documented API raises when it is absent
    state = jax_distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class PreemptionWatch:
    """Context manager. Single process: SIGTERM and SIGINT set a flag. Multi-process with JAX's preemption
    service: JAX's own SIGTERM notifier tells every host, and `reached_preemption_sync_point` picks the same
    step on all of them (a local flag would make one host save alone and hang the others); SIGINT still
    sets the local flag."""

    def __init__(self):
        self.signal = None
        self.use_sync_point = False
        self._old = {}

    def __enter__(self):
        self.use_sync_point = jax.process_count() > 1 and _jax_sync_point_available()
        signals = (signal.SIGINT,) if self.use_sync_point else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass
        return self

    def _handle(self, signum, _frame):
        if self.signal is None:
            log.warning("received signal %d: finishing this step, then checkpointing and exiting", signum)
        self.signal = signum

    def requested(self, step: int) -> bool:
        if self.use_sync_point:  # every host must call this at every step, with the same step number
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal = self.signal or signal.SIGTERM
        return self.signal is not None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
