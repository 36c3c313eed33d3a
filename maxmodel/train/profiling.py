"""`train.profile_steps=[start, end]`: a jax.profiler trace of steps start+1 .. end in <run dir>/profile,
viewable in TensorBoard's profile plugin or XProf; and the persistent compilation cache (`run.compile_cache_dir`)."""
from __future__ import annotations

import logging
from pathlib import Path

import jax

log = logging.getLogger("maxmodel.train")


def enable_compile_cache(directory: str) -> None:
    """Compiled programs are written to and read from `directory`: a restarted run skips compiling."""
    if not directory:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


class StepProfiler:
    """Starts the trace once `start` steps are done and stops it (after the device finished) at `end`."""

    def __init__(self, steps: list[int], directory: Path):
        self.start, self.end = (steps[0], steps[1]) if steps else (None, None)
        self.directory = directory
        self.active = False

    def before_step(self, step: int) -> None:
        if self.start is not None and step == self.start and not self.active:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after_step(self, step: int, outputs) -> None:
        if self.active and step >= self.end:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        if self.active:
            if outputs is not None:
                jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile of steps %d..%d written to %s", self.start + 1, self.end, self.directory)
