"""This machine's memory bandwidth, and the decode speed it allows.

At small batch, each decode step of a transformer reads every weight once, so tokens/s cannot exceed
bandwidth / weight bytes (times the batch, which shares the read). This measures the bandwidth as numpy sees
it: the best of a few copies of an array far larger than the caches, counting bytes read + bytes written
(STREAM's "copy" convention), with 1 thread and with one thread per core (numpy's copy is single-threaded
and releases the GIL, so threads copying disjoint slices show what all cores together can pull).

  python benchmarks/membw.py [--mib 256] [--repeats 5]       prints one JSON line
"""
from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _copy_seconds(src: np.ndarray, dst: np.ndarray, pool: ThreadPoolExecutor | None, threads: int) -> float:
    t0 = time.perf_counter()
    if pool is None:
        np.copyto(dst, src)
    else:
        bounds = np.linspace(0, src.size, threads + 1, dtype=np.int64)
        list(pool.map(lambda i: np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]]),
                      range(threads)))
    return time.perf_counter() - t0


def copy_bandwidth_gbps(mib: int = 256, repeats: int = 5, threads: int = 1) -> float:
    """Best copy bandwidth over `repeats` copies of a `mib` MiB array, in GB/s (1e9 bytes; read + write)."""
    src = np.ones(mib * 2**20 // 8, dtype=np.float64)  # ones, not empty: every page really mapped
    dst = np.zeros_like(src)
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        _copy_seconds(src, dst, pool, threads)  # warm-up: page faults, thread start
        best = min(_copy_seconds(src, dst, pool, threads) for _ in range(repeats))
    finally:
        if pool:
            pool.shutdown()
    return 2 * src.nbytes / best / 1e9


def bandwidth_bound_tokens_per_s(weight_bytes: float, gbps: float, batch: int = 1) -> float:
    """The decode ceiling when every step streams all weights from memory once: batch * bandwidth / bytes.
    (KV-cache reads, ignored here, lower it further at long contexts and large batches.)"""
    return batch * gbps * 1e9 / weight_bytes


def measure(mib: int = 256, repeats: int = 5) -> dict:
    cores = os.cpu_count() or 1
    single = copy_bandwidth_gbps(mib, repeats, 1)
    multi = copy_bandwidth_gbps(mib, repeats, cores) if cores > 1 else single
    return {"copy_gbps": max(single, multi), "copy_gbps_1_thread": single, f"copy_gbps_{cores}_threads": multi,
            "array_mib": mib, "repeats": repeats, "load_avg": open("/proc/loadavg").read().split()[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="array size (default 256 MiB: far beyond L3)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(measure(args.mib, args.repeats)))


if __name__ == "__main__":
    main()
