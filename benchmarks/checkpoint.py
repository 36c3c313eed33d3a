"""Checkpoint benchmark: how long a save blocks training, async vs sync, and write throughput relative to the
disk's own sequential write speed, measured in the same run on the same directory.

    PYTHONPATH=. python benchmarks/checkpoint.py [--params 100e6] [--dir /tmp/maxmodel-ckpt-bench] [--repeats 3]

The state is what the trainer saves for a model of `--params` float32 parameters: the parameters plus AdamW's
two moments (3 x 4 bytes per parameter), sharded over the local devices, written through
`maxmodel.train.checkpoint.Checkpointer` (orbax CheckpointManager, tensorstore). "Blocking" is the time
`save()` holds the training loop; "total" runs until the checkpoint has committed. The disk reference writes
the same number of bytes sequentially (64 MiB writes) and fsyncs, as a committed checkpoint must be durable.
Not part of the test suite.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from maxmodel import jsonio
from maxmodel.config.schema import CheckpointConfig
from maxmodel.train.checkpoint import Checkpointer

ROWS, COLS = 4096, 2048  # one "layer" matrix: 8.4M parameters


def make_state(n_params: float):
    """Random params (~n_params) and AdamW state, rows sharded over the local devices."""
    mesh = jax.make_mesh((jax.local_device_count(),), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = NamedSharding(mesh, PartitionSpec("x"))
    layers = max(1, round(n_params / (ROWS * COLS)))
    keys = jax.random.split(jax.random.key(0), layers)
    make = jax.jit(lambda k: jax.random.normal(k, (ROWS, COLS), np.float32), out_shardings=sh)
    params = {f"layer_{i:02d}": make(k) for i, k in enumerate(keys)}
    tx = optax.adamw(1e-3)
    # Random moments, so nothing compresses away as constant zeros.
    more = iter(jax.random.split(jax.random.key(1), 2 * layers))
    opt_state = jax.tree.map(lambda m: make(next(more)) if m.ndim == 2 else m, tx.init(params))
    jax.block_until_ready((params, opt_state))
    return params, opt_state


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def disk_sequential_write(path: Path, total: int, chunk: int = 64 << 20) -> float:
    """Seconds to write `total` bytes sequentially and fsync them (like `dd bs=64M conv=fsync`)."""
    buf = np.random.default_rng(0).integers(0, 256, chunk, dtype=np.uint8).tobytes()  # incompressible
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = total
        while left > 0:
            left -= os.write(fd, buf[: min(chunk, left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def time_saves(root: Path, use_async: bool, params, opt_state, repeats: int) -> dict:
    directory = root / ("async" if use_async else "sync")
    ckpt = Checkpointer(CheckpointConfig(every_steps=1, keep=1, async_=use_async), directory)
    blocking, total = [], []
    for step in range(repeats + 1):  # step 0 is a warm-up (directory creation, first-call costs)
        t0 = time.perf_counter()
        ckpt.save(step, [ckpt.persistent], params, opt_state, {}, {"bench": True})
        t1 = time.perf_counter()
        ckpt.wait()
        t2 = time.perf_counter()
        if step:
            blocking.append(t1 - t0)
            total.append(t2 - t0)
    on_disk = dir_bytes(directory / str(repeats))
    ckpt.close()
    shutil.rmtree(directory)
    return {"blocking_s": statistics.median(blocking), "total_s": statistics.median(total),
            "blocking_all_s": blocking, "total_all_s": total, "bytes_on_disk": on_disk}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--dir", default="/tmp/maxmodel-ckpt-bench")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.dir).absolute()
    root.mkdir(parents=True, exist_ok=True)

    params, opt_state = make_state(args.params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    state_bytes = nbytes(params) + nbytes(opt_state)
    disk_s = [disk_sequential_write(root / "seq.bin", state_bytes) for _ in range(args.repeats)]
    sync = time_saves(root, False, params, opt_state, args.repeats)
    asyn = time_saves(root, True, params, opt_state, args.repeats)
    disk = state_bytes / statistics.median(disk_s)
    out = {
        "devices": f"{jax.local_device_count()} x {jax.devices()[0].device_kind}",
        "params": n_params, "state_bytes": state_bytes, "directory": str(root),
        "disk_seq_write_MBps": disk / 1e6, "disk_seq_write_all_s": disk_s,
        "sync": sync, "async": asyn,
        "sync_write_MBps": state_bytes / sync["total_s"] / 1e6,
        "async_write_MBps": state_bytes / asyn["total_s"] / 1e6,
        "sync_write_vs_disk": state_bytes / sync["total_s"] / disk,
        "async_write_vs_disk": state_bytes / asyn["total_s"] / disk,
        "async_blocking_vs_sync": asyn["blocking_s"] / sync["blocking_s"],
    }
    print(jsonio.dumps(out, indent=1))
    print(f"\n{n_params / 1e6:.0f}M params, state {state_bytes / 1e9:.2f} GB on {out['devices']}")
    print(f"disk sequential write (fsync): {out['disk_seq_write_MBps']:.0f} MB/s")
    print(f"sync save : blocks {sync['blocking_s']:.2f} s, {out['sync_write_MBps']:.0f} MB/s "
          f"= {out['sync_write_vs_disk']:.0%} of the disk")
    print(f"async save: blocks {asyn['blocking_s']:.2f} s ({out['async_blocking_vs_sync']:.0%} of sync), "
          f"commits in {asyn['total_s']:.2f} s, {out['async_write_MBps']:.0f} MB/s "
          f"= {out['async_write_vs_disk']:.0%} of the disk")


if __name__ == "__main__":
    main()
