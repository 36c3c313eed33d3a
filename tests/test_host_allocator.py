"""The entry point's allocator restart (maxmodel/host_allocator.py): when it applies, and that it happens."""
import os
import platform
import subprocess
import sys

import pytest

from maxmodel.host_allocator import (CHOICE, GLIBC_HUGE_PAGES, MIMALLOC_ENV, allocator_env, glibc_huge_pages_work,
                                     mimalloc_library, runs_on_cpu, started_as, system_allocator_env, thp_mode)

LIB = "/x/libmimalloc.so"


def choose(env=None, system="Linux", on_cpu=True, mimalloc=LIB, glibc_huge_pages=True):
    return allocator_env(env or {}, system=system, on_cpu=on_cpu, mimalloc=mimalloc,
                         glibc_huge_pages=glibc_huge_pages)


def test_mimalloc_first_then_glibc_huge_pages_and_only_for_cpu_hosts(tmp_path):
    env = choose({"LD_PRELOAD": "/a.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == "/a.so " + LIB and env[CHOICE] == "mimalloc" and env["PATH"] == "/bin"
    assert all(env[k] == v for k, v in MIMALLOC_ENV.items())
    assert system_allocator_env(env) == {"LD_PRELOAD": "/a.so", "PATH": "/bin"}  # a peer's default again
    env = choose({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, mimalloc=None)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + GLIBC_HUGE_PAGES and env[CHOICE] == "hugepages"
    assert "LD_PRELOAD" not in env
    assert system_allocator_env(env) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert choose(mimalloc=None, glibc_huge_pages=False) is None
    assert choose({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"}, mimalloc=None) is None  # the user's own choice
    assert choose({CHOICE: "system"}) is None and choose({CHOICE: "mimalloc"}) is None  # opted out / restarted
    assert choose(system="Darwin") is None and choose(on_cpu=False) is None

    assert runs_on_cpu({}, []) and runs_on_cpu({"JAX_PLATFORMS": "cpu"}, ["/dev/accel0"])
    assert not runs_on_cpu({}, ["/dev/vfio"]) and not runs_on_cpu({"JAX_PLATFORMS": "tpu,cpu"}, [])
    assert glibc_huge_pages_work(("glibc", "2.36"), "madvise")
    assert not glibc_huge_pages_work(("glibc", "2.31"), "madvise")  # the tunable arrived in glibc 2.35
    assert not glibc_huge_pages_work(("glibc", "2.36"), "always")  # every mapping has huge pages already
    assert not glibc_huge_pages_work(("", ""), "madvise")
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    assert thp_mode(mode) == "madvise" and thp_mode(tmp_path / "absent") is None


def _run(script, *args, **extra) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in (CHOICE, "LD_PRELOAD", "GLIBC_TUNABLES")}
    env |= {"JAX_PLATFORMS": "cpu", **extra}
    return subprocess.run([sys.executable, *args, str(script)], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


PROGRAM = """import os, runpy, sys
from maxmodel.host_allocator import restart_with_fast_allocator
print("start", flush=True)
restart_with_fast_allocator()
print(os.environ.get("MAXMODEL_HOST_ALLOCATOR"), "libmimalloc" in open("/proc/self/maps").read())
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64", reason="mimalloc's wheel: Linux x86-64")
def test_the_process_restarts_itself_once_under_mimalloc(tmp_path):
    """The installed package's mimalloc is found and actually loaded into the restarted process."""
    assert mimalloc_library() is not None  # a dependency on Linux x86-64 (pyproject.toml)
    program = tmp_path / "program.py"
    program.write_text(PROGRAM)
    # the command line runs again from its start (two 'start' lines), then carries on with mimalloc mapped
    assert _run(program) == ["start", "start", "mimalloc", "True"]
    assert _run(program, "-u") == ["start", "start", "mimalloc", "True"]  # interpreter options kept
    assert _run(program, **{CHOICE: "system"}) == ["start", "system", "False"]
    # run in-process by another program (as runpy under pytest, or `maxmodel bench --suite`): never restarted
    host = tmp_path / "host.py"
    host.write_text(f"import runpy, sys\nsys.argv = [{str(program)!r}]\nrunpy.run_path({str(program)!r}, "
                    "run_name='__main__')\n")
    assert _run(host) == ["start", "None", "False"]


def test_started_as_reads_the_interpreter_command_line(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("")
    assert started_as(str(script), ["python", str(script), "--x"])
    assert started_as(str(script), ["python", "-u", "-X", "dev", str(script)])
    assert not started_as(str(script), ["python", "-c", "pass"])
    assert not started_as(str(script), ["python", "-m", "pytest", "tests"])
    import maxmodel.cli
    assert started_as(maxmodel.cli.__file__, ["python", "-m", "maxmodel.cli", "train"])
    assert not started_as(str(script), ["python", "-m", "no_such_module_here"])


def test_the_program_entry_point_still_runs_its_command():
    out = subprocess.run([sys.executable, "-m", "maxmodel.cli", "--help"], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != CHOICE})
    assert out.returncode == 0 and "train" in out.stdout
