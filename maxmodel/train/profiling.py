"""`train.profile_steps=[start, end]`: a jax.profiler trace of steps start+1 .. end in <run dir>/profile,
viewable in TensorBoard's profile plugin or XProf; and the persistent compilation cache (`run.compile_cache_dir`)."""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def compile_cache_off():
    """Programs compiled inside neither read nor write the persistent compilation cache.

    For: XLA:CPU keeps collectives in program order through one scheduling resource they all share, and an
    executable loaded from the cache gets a fresh resource per collective (`CreateResourceFromProto`), so
    independent collectives may run in any order on each device. With emulated devices a program whose
    branches hold such collectives (the zero-bubble step under fsdp x tensor: a weight step's all-gathers
    beside its recomputing scan) then deadlocks in a rendezvous and aborts; compiled afresh it runs."""
    from jax.experimental.compilation_cache import compilation_cache
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # JAX decides once per process whether the cache is used: ask again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        compilation_cache.reset_cache()


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
