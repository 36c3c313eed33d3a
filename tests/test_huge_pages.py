"""The entry point's huge-page restart (maxmodel/huge_pages.py): when it applies, and that it happens."""
import os
import platform
import subprocess
import sys

from maxmodel.huge_pages import OPT_OUT, TUNABLE, thp_mode, wanted, with_tunable

GLIBC = ("glibc", "2.36")


def test_wanted_only_where_glibc_can_ask_for_huge_pages(tmp_path):
    assert wanted({}, GLIBC, "madvise", "Linux")
    assert not wanted({}, GLIBC, "always", "Linux")  # the kernel gives every mapping huge pages already
    assert not wanted({}, GLIBC, "never", "Linux")
    assert not wanted({}, GLIBC, None, "Linux")
    assert not wanted({}, ("glibc", "2.31"), "madvise", "Linux")  # the tunable arrived in glibc 2.35
    assert not wanted({}, ("", ""), "madvise", "Linux")  # musl or unknown
    assert not wanted({}, GLIBC, "madvise", "Darwin")
    assert not wanted({OPT_OUT: "0"}, GLIBC, "madvise", "Linux")
    assert not wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"}, GLIBC, "madvise", "Linux")  # user's choice
    assert with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == \
        "glibc.malloc.arena_max=2:" + TUNABLE
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    assert thp_mode(mode) == "madvise"
    assert thp_mode(tmp_path / "absent") is None


def _run(code: str, **extra) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)} | extra
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def test_the_process_restarts_itself_once_with_the_tunable():
    code = ("from maxmodel.huge_pages import reexec_with_huge_pages as r; import os, sys; "
            "print('start', flush=True); r(); print(os.environ.get('GLIBC_TUNABLES'))")
    applies = wanted({}, platform.libc_ver(), thp_mode(), platform.system())
    out = _run(code).split()
    # the command line runs again from the start (two 'start' lines), then carries on with the tunable set
    assert out == (["start", "start", TUNABLE] if applies else ["start", "None"])
    assert _run(code, **{OPT_OUT: "0"}).split() == ["start", "None"]


def test_the_program_entry_point_still_runs_its_command():
    out = subprocess.run([sys.executable, "-m", "maxmodel.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "maxmodel" in out.stdout and "train" in out.stdout
