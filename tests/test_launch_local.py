"""`maxmodel launch local`: real child processes joined by jax.distributed, failure handling, signals."""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import COMPILE_FLAGS

from maxmodel.launch import cli
from maxmodel.launch.local import child_env

pytestmark = pytest.mark.xdist_group("multiprocess")  # see tests/test_launch_train.py

ROOT = Path(__file__).resolve().parents[1]

COLLECTIVES = """
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from maxmodel import distributed
info = distributed.initialize()
print(f"info index={info.process_index} count={info.process_count} local={info.local_device_count} "
      f"global={info.global_device_count} env={info.environment}")
gathered = multihost_utils.process_allgather(np.array([10 * info.process_index + 1]))
print("gathered", gathered.ravel().tolist())
mesh = jax.make_mesh((jax.device_count(),), ("d",))
local = np.full((jax.local_device_count(),), info.process_index + 1, np.float32)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
print("psum", float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)))
"""


def launcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "maxmodel.cli", "launch", "local", *args]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAXMODEL_", "SLURM_", "XLA_FLAGS"))}
    env.update(PYTHONPATH=str(ROOT), XLA_FLAGS=COMPILE_FLAGS)
    return env


def test_two_processes_of_two_devices_share_a_runtime():
    out = subprocess.run(launcher("--processes", "2", "--devices-per-process", "2", "--python", "--",
                                  "-c", COLLECTIVES), env=clean_env(), capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    for i in (0, 1):
        assert f"[p{i}] info index={i} count=2 local=2 global=4 env=local-launcher" in out.stdout
        assert f"[p{i}] gathered [1, 11]" in out.stdout
        # Devices of process 0 hold 1, those of process 1 hold 2: 2*1 + 2*2 across both processes.
        assert f"[p{i}] psum 6.0" in out.stdout



def test_two_process_training_exits_0_and_prints_its_sample(tmp_path):
    """The README's multi-process run with the default end-of-run sample: every process joins the sample's
    forward, process 0 prints it, and the launcher's exit code is training's."""
    tiny = ["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
            "model.d_ff=128", "data.tokenizer=bytes", "train.seq_len=32", "train.batch_size=8",
            "run.progress=false", "checkpoint.async=false"]
    out = subprocess.run(launcher("--processes", "2", "--devices-per-process", "2", "--", "train", *tiny,
                                  "train.steps=3", "mesh.data=2", "mesh.fsdp=2", f"run.output_dir={tmp_path}"),
                         env=clean_env(), capture_output=True, text=True, timeout=400, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "[p0] sample (greedy): The " in out.stdout, out.stdout[-4000:]
    assert "[p1] sample" not in out.stdout and "sample failed" not in out.stdout + out.stderr


class Watched:
    """A launcher started in the background with its output collected line by line."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(args, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 120) -> list[re.Match]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in (re.search(pattern, line) for line in list(self.lines)) if m]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                time.sleep(0.2)
                break
            time.sleep(0.05)
        raise AssertionError(f"no {count} x {pattern!r} in:\n{''.join(self.lines)}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


WAIT_FOREVER = """
import os, time
from maxmodel import distributed
info = distributed.initialize()
print(f"ready {info.process_index} pid={os.getpid()} global={info.global_device_count}", flush=True)
while True:
    time.sleep(0.2)
"""


def test_killing_one_worker_stops_the_other_and_fails_fast():
    run = Watched(launcher("--processes", "2", "--devices-per-process", "2", "--python", "--", "-c", WAIT_FOREVER))
    ready = run.wait_for(r"\[p(\d)\] ready (\d) pid=(\d+) global=4", count=2)
    pids = {int(m.group(1)): int(m.group(3)) for m in ready}
    start = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    code = run.proc.wait(timeout=30)
    elapsed = time.monotonic() - start
    assert code != 0
    assert elapsed < 30
    assert not alive(pids[0])
    assert any("process 1 exited with code -9; stopping the others" in line for line in run.lines)


def test_first_failing_exit_code_is_returned():
    code = ("import os, sys, time\n"
            "if os.environ['MAXMODEL_PROCESS_ID'] == '1': sys.exit(7)\n"
            "time.sleep(60)\n")
    start = time.monotonic()
    out = subprocess.run(launcher("--processes", "2", "--python", "--", "-c", code), env=clean_env(),
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 7
    assert time.monotonic() - start < 30


def test_sigterm_is_forwarded_and_the_preempted_exit_code_kept():
    code = ("import os, signal, sys, time\n"
            "def stop(*_):\n"
            "    print('checkpointing', flush=True); sys.exit(3)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "print('ready', os.environ['MAXMODEL_PROCESS_ID'], flush=True)\n"
            "while True: time.sleep(0.1)\n")
    run = Watched(launcher("--processes", "2", "--python", "--", "-c", code))
    run.wait_for(r"\[p\d\] ready", count=2, timeout=60)
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=30) == 3
    run.wait_for(r"\[p\d\] checkpointing", count=2, timeout=5)


def test_child_environment_matches_what_distributed_reads():
    env = child_env(1, 2, 4, 5555, base={"PATH": "/bin"})
    assert env["MAXMODEL_COORDINATOR_ADDRESS"] == "127.0.0.1:5555"
    assert (env["MAXMODEL_NUM_PROCESSES"], env["MAXMODEL_PROCESS_ID"], env["MAXMODEL_CPU_DEVICES"]) == ("2", "1", "4")
    assert env["JAX_PLATFORMS"] == "cpu" and env["PATH"] == "/bin"


@pytest.mark.parametrize("args, named", [
    (["--processes", "2", "--devices-per-process", "2", "--", "train", "mesh.data=8"], "mesh.data"),
    (["--processes", "2", "--devices-per-process", "2", "--", "train", "mesh.fsdp=3"], "mesh.fsdp"),
    (["--processes", "0", "--", "train"], "--processes"),
    (["--processes", "2"], "nothing to run"),
    (["--processes", "2", "--", "train", "mesh.bogus=2"], "mesh.bogus"),
])
def test_bad_input_exits_2_naming_it(args, named, capsys):
    assert cli.main(["local", *args]) == 2
    assert named in capsys.readouterr().err


SYNC_POINT = """
import sys, time
from maxmodel import distributed
info = distributed.initialize()
print("ready", flush=True)
step = 0
while True:
    step += 1
    if distributed.preemption_requested(step):
        print(f"checkpoint at step {step}", flush=True)
        sys.exit(3)
    time.sleep(0.02)
"""


def test_forwarded_sigterm_reaches_all_processes_at_the_same_step():
    run = Watched(launcher("--processes", "2", "--devices-per-process", "1", "--python", "--", "-c", SYNC_POINT))
    run.wait_for(r"\[p\d\] ready", count=2)
    time.sleep(0.5)
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=30) == 3
    steps = {m.group(1) for m in run.wait_for(r"\[p\d\] checkpoint at step (\d+)", count=2, timeout=5)}
    assert len(steps) == 1
