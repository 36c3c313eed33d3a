"""Back glibc malloc's large allocations with transparent huge pages (THP) before JAX starts.

XLA:CPU allocates each execution's temporaries and outputs afresh. Above glibc's mmap threshold every one is
a new mapping, and with the kernel's usual THP mode (`madvise`: huge pages only where a program asks) its
4 KiB pages fault in one at a time on first touch, every step: a [1024, 32768] float32 product output is
32,768 page faults. With glibc's `glibc.malloc.hugetlb=1` tunable (glibc >= 2.35) malloc asks for huge pages
on those mappings, 512 times fewer faults. Measured on bench-50m's train step, bf16 on a 2-core AMX Xeon,
`benchmarks/step_profile.py` (benchmarks/RESULTS.md): 2.46 s -> 2.12 s per step.

glibc reads its tunables only when a process starts, so the `maxmodel` entry point executes itself again,
once, with the tunable added to GLIBC_TUNABLES (children it launches inherit it). Nothing happens where it
cannot help: not Linux / glibc, glibc older than 2.35, THP `never` (or `always`: every mapping gets huge pages
already), the tunable already set, or MAXMODEL_HUGE_PAGES=0.
"""
from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "MAXMODEL_HUGE_PAGES"
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(path: Path = THP_MODE_FILE) -> str | None:
    """The kernel's THP mode, the bracketed word of e.g. `always [madvise] never`; None where unreadable."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def wanted(env: Mapping[str, str], libc: tuple[str, str], mode: str | None, system: str) -> bool:
    """Whether this process should be restarted with the tunable (pure: the caller reads the machine)."""
    if system != "Linux" or env.get(OPT_OUT, "1") == "0" or mode != "madvise":
        return False
    name, version = libc
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    if name != "glibc" or (major, minor) < (2, 35):
        return False
    return "glibc.malloc.hugetlb" not in env.get("GLIBC_TUNABLES", "")


def with_tunable(env: Mapping[str, str]) -> dict[str, str]:
    """env with TUNABLE appended to GLIBC_TUNABLES (its other tunables kept)."""
    current = env.get("GLIBC_TUNABLES", "")
    return {**env, "GLIBC_TUNABLES": f"{current}:{TUNABLE}" if current else TUNABLE}


def reexec_with_huge_pages() -> None:
    """Execute this same command line again with the tunable, where `wanted`; otherwise return. Call it first
    thing in a program's entry point (never from a library function: the process is replaced)."""
    env = dict(os.environ)
    if not wanted(env, platform.libc_ver(), thp_mode(), platform.system()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_tunable(env))
