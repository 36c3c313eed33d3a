"""The memory allocator of a process whose JAX runs on the CPU, chosen before JAX starts.

XLA:CPU allocates every execution's temporaries and outputs afresh and frees them when it ends. glibc's
malloc returns each large block to the kernel (munmap) and maps a new one for the next step, so each of its
4 KiB pages faults in, zeroed, again on every step: a [1024, 32768] float32 product output alone is 32,768
faults. mimalloc (PyPI `cmeel-mimalloc`, loaded with LD_PRELOAD as its authors describe) keeps what is freed
for the next allocation (MIMALLOC_PURGE_DELAY=-1: a training step frees and reallocates the same sizes every
step) and maps its arenas with huge pages (MIMALLOC_ALLOW_LARGE_OS_PAGES=1). Without mimalloc, glibc's own
`glibc.malloc.hugetlb=1` tunable (glibc >= 2.35, kernel THP mode `madvise`) at least takes the faults 2 MiB
at a time. bench-50m's bf16 train step on a 2-core AMX Xeon (`maxmodel bench`, benchmarks/RESULTS.md):
glibc 2.3-2.5 s, glibc + huge pages 1.8-1.9 s, mimalloc 1.56-1.60 s.

Both take effect only from a process's start, so the `maxmodel` program (cli.entry) executes itself again,
once, with the variables set; processes it launches inherit them. Nothing changes on a host with a TPU or GPU
(JAX_PLATFORMS other than cpu, or a device node of one), off Linux, where neither mechanism is available, or
with MAXMODEL_HOST_ALLOCATOR=system. The choice made is left in MAXMODEL_HOST_ALLOCATOR (mimalloc or
hugepages), which also keeps the restarted process from restarting again.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

CHOICE = "MAXMODEL_HOST_ALLOCATOR"
MIMALLOC_DIST, MIMALLOC_LIB = "cmeel-mimalloc", "cmeel.prefix/lib/libmimalloc.so"
MIMALLOC_ENV = {"MIMALLOC_PURGE_DELAY": "-1", "MIMALLOC_ALLOW_LARGE_OS_PAGES": "1"}
GLIBC_HUGE_PAGES = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ACCELERATOR_NODES = ("/dev/accel0", "/dev/vfio", "/dev/nvidia0", "/dev/nvidiactl")


def mimalloc_library() -> str | None:
    """Path of the installed mimalloc shared library, None where cmeel-mimalloc is not installed."""
    try:
        path = Path(importlib.metadata.distribution(MIMALLOC_DIST).locate_file(MIMALLOC_LIB))
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(path) if path.is_file() else None


def thp_mode(path: Path = THP_MODE_FILE) -> str | None:
    """The kernel's THP mode, the bracketed word of e.g. `always [madvise] never`; None where unreadable."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def runs_on_cpu(env: Mapping[str, str], device_nodes: list[str]) -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS says only cpu, or it is unset and no accelerator's
    device node exists."""
    platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    return platforms == ["cpu"] if platforms else not device_nodes


def glibc_huge_pages_work(libc: tuple[str, str], mode: str | None) -> bool:
    name, version = libc
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return name == "glibc" and (major, minor) >= (2, 35) and mode == "madvise"


def allocator_env(env: Mapping[str, str], *, system: str, on_cpu: bool, mimalloc: str | None,
                  glibc_huge_pages: bool) -> dict[str, str] | None:
    """The environment to restart this process with, or None to carry on as is (pure: the caller reads the
    machine)."""
    if CHOICE in env or system != "Linux" or not on_cpu:
        return None
    if mimalloc:
        preload = " ".join(filter(None, [env.get("LD_PRELOAD", ""), mimalloc]))
        return {**env, **MIMALLOC_ENV, "LD_PRELOAD": preload, CHOICE: "mimalloc"}
    if glibc_huge_pages and "glibc.malloc.hugetlb" not in env.get("GLIBC_TUNABLES", ""):
        tunables = ":".join(filter(None, [env.get("GLIBC_TUNABLES", ""), GLIBC_HUGE_PAGES]))
        return {**env, "GLIBC_TUNABLES": tunables, CHOICE: "hugepages"}
    return None


def system_allocator_env(env: Mapping[str, str]) -> dict[str, str]:
    """env without what allocator_env added: for a child that must run as it would by default (a benchmark's
    peer, e.g. torch)."""
    out = {k: v for k, v in env.items() if k != CHOICE and k not in MIMALLOC_ENV}
    preload = " ".join(p for p in out.get("LD_PRELOAD", "").split() if not p.endswith("/libmimalloc.so"))
    tunables = ":".join(t for t in out.get("GLIBC_TUNABLES", "").split(":") if t and t != GLIBC_HUGE_PAGES)
    for key, value in (("LD_PRELOAD", preload), ("GLIBC_TUNABLES", tunables)):
        out.pop(key, None)
        if value:
            out[key] = value
    return out


def started_as(program: str, orig_argv: list[str]) -> bool:
    """Whether the interpreter's own command line (orig_argv) ran `program` (a script path, or the file of an
    `-m` module): the process may then execute that command line again. False for `-c` and for a program run
    in-process by another one (runpy under pytest, `maxmodel bench --suite`): restarting would rerun the host."""
    args, i = orig_argv[1:], 0
    while i < len(args) and args[i].startswith("-") and args[i] not in ("-m", "-c", "-"):
        i += 2 if args[i] in ("-X", "-W") else 1  # interpreter options, the two that take a value included
    if i >= len(args) or args[i] in ("-c", "-"):
        return False
    if args[i] == "-m":
        try:
            spec = importlib.util.find_spec(args[i + 1]) if i + 1 < len(args) else None
        except (ImportError, ValueError):
            return False
        target = spec.origin if spec else None
    else:
        target = args[i]
    return bool(target) and os.path.realpath(target) == os.path.realpath(program)


def restart_with_fast_allocator() -> None:
    """Execute this same command line again with `allocator_env`'s variables, where it gives any; otherwise
    return. For a program's entry point, before JAX is imported (the process is replaced); a no-op where the
    process was not started as this program (`started_as`)."""
    if not started_as(sys.argv[0], sys.orig_argv):
        return
    env = allocator_env(os.environ, system=platform.system(),
                        on_cpu=runs_on_cpu(os.environ, [p for p in ACCELERATOR_NODES if os.path.exists(p)]),
                        mimalloc=mimalloc_library(),
                        glibc_huge_pages=glibc_huge_pages_work(platform.libc_ver(), thp_mode()))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
