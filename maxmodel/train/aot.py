"""Ahead-of-time compile of the real sharded train step for a TPU topology, on a CPU host.

With libtpu installed (`pip install maxmodel[tpu]`), `jax.experimental.topologies` describes the chips of a
slice without owning them; the step lowered with abstract arrays over those devices compiles with XLA's TPU
backend, and `memory_analysis()` gives the real per-chip memory. A layout is validated before paying for a pod.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass

import jax
from flax import nnx

from maxmodel.config.errors import ConfigError
from maxmodel.config.schema import Config

GIB = 1024 ** 3


class DoesNotFit(Exception):
    """The TPU compiler found that the step needs more memory per chip than the chip has.

    `used_bytes` / `hbm_bytes`: the compiler's own figures ("Used 120.1G of 95.7G hbm") when it gave them."""

    def __init__(self, message: str, used_bytes: float | None = None, hbm_bytes: float | None = None,
                 mesh: dict | None = None):
        super().__init__(message)
        self.used_bytes, self.hbm_bytes, self.mesh = used_bytes, hbm_bytes, mesh or {}


_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _used_of_hbm(message: str, argument_bytes: int) -> tuple[float | None, float | None]:
    """(needed, capacity) bytes from XLA:TPU's out-of-memory message (its G are GiB); (None, None) if absent.

    The compiler says either "Used X of Y hbm" (everything) or "... for HLO temporaries (X) exceeds available
    HBM (Y)" (temporaries alone: the step's arguments are added, as `needed_bytes` counts them)."""
    num = r"([\d.]+)([KMGT])"
    if m := re.search(rf"Used {num} of {num} hbm", message):
        return float(m[1]) * _UNITS[m[2]], float(m[3]) * _UNITS[m[4]]
    if m := re.search(rf"HLO temporaries \({num}\) exceeds available HBM \({num}\)", message):
        return float(m[1]) * _UNITS[m[2]] + argument_bytes, float(m[3]) * _UNITS[m[4]]
    return None, None


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of abstract arrays with shardings (the largest shard: uneven splits pad)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@dataclass
class CompileReport:
    topology: str
    slices: int
    devices: int
    device_kind: str
    mesh: dict
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes_per_device: float
    host_temp_bytes: int = 0  # activations offloaded to host memory (train.remat=*_offloaded)

    @property
    def needed_bytes(self) -> int:
        """Live bytes per device at peak: inputs + outputs (donated ones counted once) + temporaries + code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.hbm_bytes_per_device

    def as_dict(self) -> dict:
        return {**asdict(self), "needed_bytes": self.needed_bytes, "fits": self.fits}


def topology_devices(topology: str, slices: int):
    """(devices, chips per slice, HBM bytes per device) of e.g. `v5p-8` × slices, via libtpu."""
    from maxmodel.launch.catalog import tpu_slice
    from maxmodel.launch.errors import LaunchError
    from maxmodel.planner.hardware import get_chip
    try:
        tpu = tpu_slice(topology, key="--topology")
    except LaunchError as e:
        raise ConfigError("--topology", str(e).split(": ", 1)[-1]) from None
    if slices < 1:
        raise ConfigError("--slices", f"must be >= 1, got {slices}")
    # Compiling needs no chip, so several processes (parallel test workers) may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        import libtpu  # noqa: F401  (the TPU compiler; optional extra `tpu`)
        from jax.experimental import topologies
    except ImportError:
        raise ConfigError("--topology", "ahead-of-time TPU compile needs libtpu: pip install 'maxmodel[tpu]'") from None
    family = {"v5litepod": "v5e"}.get(tpu.family.prefix, tpu.family.prefix)
    dims = tpu.topology.split("x")
    bounds = tuple(int(d) for d in ([*dims, "1"] if len(dims) == 2 else dims))
    host_bounds = (min(2, bounds[0]), min(2 if tpu.chips_per_host <= 4 else 4, bounds[1]), 1)
    desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{family}:{tpu.topology}",
                                        chips_per_host_bounds=host_bounds, num_slices=slices)
    devices = list(desc.devices)
    per_chip = len(devices) // (tpu.chips * slices)   # v4 shows each of a chip's two TensorCores
    return devices, get_chip(family).hbm_bytes / max(per_chip, 1)


def compile_for_topology(cfg: Config, topology: str, slices: int = 1) -> CompileReport:
    from maxmodel.parallel.mesh import build_mesh
    from maxmodel.parallel.rules import mesh_rules
    from .checkpoint import abstract_like
    from .step import abstract_state, batch_keys, batch_sharding, build_train_step

    devices, hbm = topology_devices(topology, slices)
    mesh = build_mesh(cfg.mesh, devices)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_rules(cfg.mesh, mesh)):
        graphdef, abstract = abstract_state(cfg)
        ts = build_train_step(cfg, graphdef, abstract, mesh)
        params = abstract_like(abstract, ts.param_shardings)
        opt = abstract_like(ts.abstract_opt, ts.opt_shardings)
        shape = (cfg.train.batch_size, cfg.train.seq_len)
        sh = batch_sharding(mesh)
        batch = {k: jax.ShapeDtypeStruct(shape, jax.numpy.float32 if k == "loss_mask" else jax.numpy.int32,
                                         sharding=sh) for k in batch_keys(cfg)}
        lowered = ts.step_fn.lower(params, opt, batch)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # XLA's TPU compiler refuses programs whose buffers exceed HBM; report its figures.
        message = str(e).split(':', 2)[-1].split('HLO module')[0].strip()
        raise DoesNotFit(f"{topology} × {slices}: {message}",
                         *_used_of_hbm(message, _per_device_bytes((params, opt, batch))), dict(mesh.shape)) from None
    mem = compiled.memory_analysis()
    return CompileReport(topology, slices, len(devices), devices[0].device_kind, dict(mesh.shape),
                         mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                         mem.temp_size_in_bytes, mem.generated_code_size_in_bytes, hbm,
                         mem.host_temp_size_in_bytes)
