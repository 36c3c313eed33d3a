"""Process start-up: emulated CPU devices and (multi-process) jax.distributed initialisation."""
from __future__ import annotations

import os
from dataclasses import dataclass

import jax


@dataclass(frozen=True)
class ProcessInfo:
    process_index: int
    process_count: int
    local_device_count: int
    global_device_count: int
    coordinator: str | None = None
    environment: str = "single"


_INFO: ProcessInfo | None = None


def initialize(cpu_devices: int | None = None) -> ProcessInfo:
    """Call once before any JAX backend use; later calls return the same info."""
    global _INFO
    if _INFO is not None:
        return _INFO
    n = int(os.environ.get("MAXMODEL_CPU_DEVICES", cpu_devices or 0))
    if n and os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu"):
        jax.config.update("jax_num_cpu_devices", n)
    _INFO = ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return _INFO


def is_main_process() -> bool:
    return jax.process_index() == 0
