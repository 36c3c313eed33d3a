"""Accelerator catalog: bf16 dense peak, HBM size and bandwidth, and per-chip interconnect bandwidth.

Figures are per chip (per GPU) as published by the vendor; "dense" means without 2:4 structured sparsity
(NVIDIA's headline numbers double with sparsity, we never use those). Interconnect is one direction, per chip.
"""
from __future__ import annotations

from dataclasses import dataclass

from maxmodel.config.errors import ConfigError

GiB = 2**30
GB = 1e9


@dataclass(frozen=True)
class Chip:
    name: str
    bf16_flops: float      # peak dense bf16 FLOP/s
    hbm_bytes: float       # HBM capacity
    hbm_bw: float          # HBM bandwidth, bytes/s
    link_bw: float         # chip-to-chip bandwidth (ICI / NVLink), bytes/s, one direction
    kind: str              # "tpu" | "gpu"
    source: str


CHIPS: dict[str, Chip] = {c.name: c for c in [
    # Cloud TPU docs, "TPU v4" (cloud.google.com/tpu/docs/v4): 275 TFLOPs bf16, 32 GiB HBM2, 1200 GBps;
    # ICI 2400 Gbps per chip.
    Chip("v4", 275e12, 32 * GiB, 1200 * GB, 300 * GB, "tpu", "cloud.google.com/tpu/docs/v4"),
    # Cloud TPU docs, "TPU v5e": 197 TFLOPs bf16, 16 GB HBM2, 819 GBps, ICI 400 GBps bidirectional.
    Chip("v5e", 197e12, 16 * GiB, 819 * GB, 200 * GB, "tpu", "cloud.google.com/tpu/docs/v5e"),
    # Cloud TPU docs, "TPU v5p": 459 TFLOPs bf16, 95 GiB HBM2e, 2765 GBps, ICI 4800 Gbps per chip.
    Chip("v5p", 459e12, 95 * GiB, 2765 * GB, 600 * GB, "tpu", "cloud.google.com/tpu/docs/v5p"),
    # Cloud TPU docs, "TPU v6e" (Trillium): 918 TFLOPs bf16, 32 GB HBM, 1638 GBps, ICI 800 GBps bidirectional.
    Chip("v6e", 918e12, 32 * GiB, 1638 * GB, 400 * GB, "tpu", "cloud.google.com/tpu/docs/v6e"),
    # NVIDIA A100 datasheet (SXM 80GB): BF16 tensor 312 TFLOPS dense, 80 GB HBM2e, 2039 GB/s; NVLink 600 GB/s.
    Chip("a100-80gb", 312e12, 80 * GB, 2039 * GB, 300 * GB, "gpu", "NVIDIA A100 80GB SXM datasheet"),
    # NVIDIA H100 datasheet (SXM5): BF16 1979 TFLOPS with sparsity = 989 dense, 80 GB HBM3, 3.35 TB/s;
    # NVLink 900 GB/s bidirectional.
    Chip("h100", 989e12, 80 * GB, 3350 * GB, 450 * GB, "gpu", "NVIDIA H100 SXM5 datasheet"),
    # NVIDIA H200 datasheet (SXM): same compute as H100 (989 dense), 141 GB HBM3e, 4.8 TB/s; NVLink 900 GB/s.
    Chip("h200", 989e12, 141 * GB, 4800 * GB, 450 * GB, "gpu", "NVIDIA H200 SXM datasheet"),
    # NVIDIA HGX/DGX B200 datasheets: FP16/BF16 4.5 PFLOPS with sparsity = 2.25 dense per GPU;
    # 1,440 GB HBM3e per 8 GPUs = 180 GB usable each, 62 TB/s per 8 GPUs ≈ 7.7 TB/s; NVLink 5 1.8 TB/s bidir.
    Chip("b200", 2250e12, 180 * GB, 7700 * GB, 900 * GB, "gpu", "NVIDIA HGX B200 / DGX B200 datasheets"),
]}

ALIASES = {"a100": "a100-80gb", "tpu-v4": "v4", "tpu-v5e": "v5e", "tpu-v5p": "v5p", "tpu-v6e": "v6e",
           "trillium": "v6e", "h100-sxm": "h100", "h200-sxm": "h200"}


def get_chip(name: str) -> Chip:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in CHIPS:
        raise ConfigError("--chip", f"unknown chip '{name}'; known: {', '.join(CHIPS)}")
    return CHIPS[key]


def default_topology(chip: Chip, chips: int) -> str:
    """A TPU topology name for `chips` chips, as `jax.experimental.topologies` spells it (e.g. v5p:2x2x2).

    v4 and v5p are 3-D tori (4 chips per host as 2x2x1); v5e and v6e are 2-D (8 chips per host as 2x4).
    """
    if chip.kind != "tpu":
        raise ConfigError("--compile", f"ahead-of-time compile targets TPU topologies; {chip.name} is a GPU")
    if chips & (chips - 1):
        raise ConfigError("--chips", f"a TPU slice has a power-of-two chip count, got {chips}")
    dims = [1, 1, 1] if chip.name in ("v4", "v5p") else [1, 1]
    i = 0
    while dims[0] * dims[1] * (dims[2] if len(dims) == 3 else 1) < chips:
        dims[i % len(dims)] *= 2
        i += 1
    dims.sort()
    return f"{chip.name}:{'x'.join(map(str, dims))}"
