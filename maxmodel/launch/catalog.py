"""Cloud TPU types: chips, hosts, topology, runtime image and GKE labels for each accelerator type name.

A TPU type is written `<family>-<N>`. For v4 and v5p, N counts TensorCores (two per chip), so v5p-256 is
128 chips; for v5e (`v5litepod`) and v6e, N counts chips. Sources (checked against the published tables):
  - TPU versions and slice shapes: https://cloud.google.com/tpu/docs/v4, .../v5p, .../v5e, .../v6e
    ("Configurations" tables: topology, chips, hosts; 4 chips per host on multi-host slices, v5e/v6e
    single-host VMs hold up to 8 chips).
  - TPU VM runtime versions: https://cloud.google.com/tpu/docs/runtimes
    (v4: tpu-ubuntu2204-base, v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e).
  - GKE node labels `cloud.google.com/gke-tpu-accelerator` / `gke-tpu-topology` and machine types:
    https://cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus
    (tpu-v4-podslice / ct4p-hightpu-4t, tpu-v5p-slice / ct5p-hightpu-4t,
    tpu-v5-lite-podslice / ct5lp-hightpu-{1,4,8}t, tpu-v6e-slice / ct6e-standard-{1,4,8}t).
Only the standard (power-of-two, plus v5p's largest) slice shapes are listed; other shapes can be added here.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

from .errors import LaunchError


@dataclass(frozen=True)
class Family:
    prefix: str                  # the accelerator-type prefix gcloud uses
    cores_per_chip: int          # 2 where the type name counts TensorCores, 1 where it counts chips
    chips_per_host: int          # on multi-host slices
    max_single_host_chips: int   # slices up to this many chips run on one VM
    runtime_version: str
    gke_accelerator: str
    gke_machine_prefix: str      # + "-<chips per VM>t"
    topologies: tuple[str, ...]


_V4_TOPOLOGIES = ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16", "8x16x16")
_2D_TOPOLOGIES = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")

FAMILIES = {
    "v4": Family("v4", 2, 4, 4, "tpu-ubuntu2204-base", "tpu-v4-podslice", "ct4p-hightpu", _V4_TOPOLOGIES),
    "v5p": Family("v5p", 2, 4, 4, "v2-alpha-tpuv5", "tpu-v5p-slice", "ct5p-hightpu",
                  _V4_TOPOLOGIES + ("16x16x16", "16x16x24")),
    "v5litepod": Family("v5litepod", 1, 4, 8, "v2-alpha-tpuv5-lite", "tpu-v5-lite-podslice", "ct5lp-hightpu",
                        _2D_TOPOLOGIES),
    "v6e": Family("v6e", 1, 4, 8, "v2-alpha-tpuv6e", "tpu-v6e-slice", "ct6e-standard", _2D_TOPOLOGIES),
}
ALIASES = {"v5e": "v5litepod"}   # people say v5e; gcloud says v5litepod


@dataclass(frozen=True)
class TpuSlice:
    """One slice of a TPU type."""
    name: str                    # e.g. "v5p-256"
    family: Family
    chips: int
    topology: str

    @property
    def hosts(self) -> int:
        if self.chips <= self.family.max_single_host_chips:
            return 1
        return self.chips // self.family.chips_per_host

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts

    @property
    def gke_machine_type(self) -> str:
        return f"{self.family.gke_machine_prefix}-{self.chips_per_host}t"


def _chips(topology: str) -> int:
    return math.prod(int(x) for x in topology.split("x"))


def known_types() -> list[str]:
    names = []
    for fam in FAMILIES.values():
        names += [f"{fam.prefix}-{_chips(t) * fam.cores_per_chip}" for t in fam.topologies]
    return names


def tpu_slice(name: str, key: str = "--tpu-type") -> TpuSlice:
    """Look up a TPU type such as `v5p-256`; an unknown one raises LaunchError naming it."""
    prefix, _, size = name.strip().partition("-")
    prefix = ALIASES.get(prefix, prefix)
    fam = FAMILIES.get(prefix)
    if fam is None or not size.isdigit():
        hint = difflib.get_close_matches(name, known_types(), n=3)
        families = ", ".join(sorted(FAMILIES))
        raise LaunchError(f"{key}: unknown TPU type '{name}' (families: {families}"
                          + (f"; did you mean {', '.join(hint)}?)" if hint else ")"))
    for topology in fam.topologies:
        if _chips(topology) * fam.cores_per_chip == int(size):
            return TpuSlice(f"{fam.prefix}-{size}", fam, _chips(topology), topology)
    sizes = ", ".join(str(_chips(t) * fam.cores_per_chip) for t in fam.topologies)
    raise LaunchError(f"{key}: unknown TPU type '{name}': {fam.prefix} comes in sizes {sizes}")
