"""Shared fixtures. Eight CPU devices are emulated for the whole test session (before JAX initialises)."""
from __future__ import annotations

import os

# CPU only, also in subprocesses: never probe an installed libtpu (it takes a machine-wide lock file).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MAXMODEL_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "maxmodel"))
# Compiled programs are cached on disk: the suite's many short trainer runs (and their subprocesses) compile
# the same few steps, and a cache hit takes a second where a compile takes tens on two shared cores.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["MAXMODEL_CACHE"], "jax-compile"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# LLVM's optimisation passes are most of an XLA:CPU compile; the suite's models are tiny, so unoptimised code
# runs about as fast and compiles in about half the time.
# Subprocesses that start from a clean environment pass COMPILE_FLAGS on.
COMPILE_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + COMPILE_FLAGS).strip()

from maxmodel import distributed  # noqa: E402  (after the environment is set)

distributed.initialize(cpu_devices=8)

import pytest  # noqa: E402  (after the device count is set)

# A small model and short sequences: every test compiles in seconds on 2 cores.
TINY = ["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=128",
        "model.vocab_size=512", "train.seq_len=32", "train.batch_size=8", "optimizer.warmup_steps=2",
        "run.progress=false", "run.sample_tokens=0"]


@pytest.fixture
def tiny_overrides(tmp_path):
    return TINY + [f"run.output_dir={tmp_path}", "data.source=synthetic"]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent XLA cache directory for a module whose runs recompile the same programs (a resumed run,
    the same run on another layout): pass it as run.compile_cache_dir. It is switched off again after the
    module, so other tests (which time compilation) never read from it."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    yield tmp_path_factory.mktemp("xla-cache")
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    compilation_cache.reset_cache()


def pytest_itemcollected(item):
    """Under `--dist loadgroup` a module's tests stay on one worker: its module-scoped fixtures (trained runs,
    compiled engines) are then built once, not once per worker that happens to draw one of its tests. Tests
    that name their own xdist_group (several modules sharing one worker) keep it. (Marked here, as each item
    is collected, so xdist's own collection hook always sees the mark.)"""
    if item.get_closest_marker("xdist_group") is None:
        item.add_marker(pytest.mark.xdist_group(item.module.__name__))
