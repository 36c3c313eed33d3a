"""`maxmodel launch local`: N processes on this machine, each with K emulated CPU devices, joined by JAX's
distributed runtime on 127.0.0.1 — a rehearsal of a multi-host job on one box.

    maxmodel launch local --processes 2 --devices-per-process 2 -- train run.name=rehearsal
    maxmodel launch local --processes 2 --python -- -c "from maxmodel import distributed; distributed.initialize()"

Each child gets MAXMODEL_COORDINATOR_ADDRESS=127.0.0.1:<free port>, MAXMODEL_NUM_PROCESSES, MAXMODEL_PROCESS_ID,
MAXMODEL_CPU_DEVICES and JAX_PLATFORMS=cpu (read by `maxmodel.distributed.initialize`) and runs
`python -m maxmodel.cli <args>` (with --python: `python <args>`). Output lines are prefixed `[pK]`.
If a child exits non-zero, the others get SIGTERM and, after --stop-grace seconds, SIGKILL (a process stuck
in a collective with a dead peer never returns to Python); the launcher exits with the first failing code.
SIGINT/SIGTERM to the launcher are sent on to the children as SIGTERM, so a trainer checkpoints and exits 3;
a second signal kills them. Children run in their own process groups so a terminal's Ctrl-C reaches them
only once, through the launcher.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from .common import check_mesh, command_config
from .errors import LaunchError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(index: int, processes: int, devices: int, port: int, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update({
        "MAXMODEL_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "MAXMODEL_NUM_PROCESSES": str(processes),
        "MAXMODEL_PROCESS_ID": str(index),
        "MAXMODEL_CPU_DEVICES": str(devices),
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",   # lines reach the prefixer as they are printed
    })
    return env


class Group:
    """The children, their output pumps and the stop logic."""

    def __init__(self, commands: list[list[str]], envs: list[dict], out=None):
        self.out = out or sys.stdout.buffer
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        for i, (cmd, env) in enumerate(zip(commands, envs)):
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            self.procs.append(proc)
            self.say(f"started process {i} (pid {proc.pid})")
            pump = threading.Thread(target=self._pump, args=(i, proc), daemon=True)
            pump.start()
            self.pumps.append(pump)

    def write(self, data: bytes) -> None:
        with self.lock:
            self.out.write(data)
            self.out.flush()

    def say(self, text: str) -> None:
        self.write(f"[launch] {text}\n".encode())

    def _pump(self, index: int, proc: subprocess.Popen) -> None:
        prefix = f"[p{index}] ".encode()
        for line in iter(proc.stdout.readline, b""):
            self.write(prefix + (line if line.endswith(b"\n") else line + b"\n"))

    def signal_all(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)   # the child and anything it started (data workers)
                except ProcessLookupError:
                    pass

    def wait(self, stop_grace: float, signal_grace: float) -> int:
        """Wait for all children; returns the launcher's exit code."""
        first_failure: int | None = None
        kill_at: float | None = None
        signals = []

        def on_signal(signum, _frame):
            signals.append(signum)

        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        handled = 0
        try:
            while True:
                while handled < len(signals):
                    handled += 1
                    if handled == 1:
                        self.say(f"got {signal.Signals(signals[0]).name}; sending SIGTERM to all processes")
                        self.signal_all(signal.SIGTERM)
                        kill_at = min(kill_at or float("inf"), time.monotonic() + signal_grace)
                    else:
                        self.say("second signal; killing all processes")
                        kill_at = time.monotonic()
                codes = [p.poll() for p in self.procs]
                if all(c is not None for c in codes):
                    break
                for i, code in enumerate(codes):
                    if code not in (None, 0) and first_failure is None:
                        first_failure = code
                        if not signals:
                            self.say(f"process {i} exited with code {code}; stopping the others")
                            self.signal_all(signal.SIGTERM)
                            kill_at = time.monotonic() + stop_grace
                if kill_at is not None and time.monotonic() >= kill_at:
                    self.signal_all(signal.SIGKILL)
                    kill_at = float("inf")
                time.sleep(0.05)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.signal_all(signal.SIGKILL)   # no-op unless we are leaving through an exception
        for pump in self.pumps:
            pump.join(timeout=2)
        if first_failure is None:
            first_failure = next((p.returncode for p in self.procs if p.returncode), 0)
        # A child killed by a signal has a negative code; the launcher reports that as a plain failure.
        return first_failure if first_failure >= 0 else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maxmodel launch local", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=2, help="number of processes (default 2)")
    p.add_argument("--devices-per-process", type=int, default=4,
                   help="emulated CPU devices in each process (default 4)")
    p.add_argument("--python", action="store_true",
                   help="the arguments after -- go to the Python interpreter (-c CODE, -m MODULE, a script) "
                        "instead of to `maxmodel`")
    p.add_argument("--stop-grace", type=float, default=5.0,
                   help="seconds between SIGTERM and SIGKILL when one process failed (default 5)")
    p.add_argument("--signal-grace", type=float, default=120.0,
                   help="seconds the processes get to checkpoint after a forwarded Ctrl-C/SIGTERM (default 120)")
    return p


def main(argv: list[str], command: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.processes < 1:
        raise LaunchError(f"--processes must be >= 1, got {args.processes}")
    if args.devices_per_process < 1:
        raise LaunchError(f"--devices-per-process must be >= 1, got {args.devices_per_process}")
    if not command:
        raise LaunchError("nothing to run: put the maxmodel command after --, e.g. -- train run.name=x")
    if not args.python:
        devices = args.processes * args.devices_per_process
        check_mesh(command_config(command), devices,
                   f"{args.processes} processes x {args.devices_per_process} devices = {devices} devices")
    base = [sys.executable] if args.python else [sys.executable, "-m", "maxmodel.cli"]
    port = free_port()
    envs = [child_env(i, args.processes, args.devices_per_process, port) for i in range(args.processes)]
    group = Group([base + command] * args.processes, envs)
    code = group.wait(args.stop_grace, args.signal_grace)
    group.say(f"exit code {code}")
    return code
