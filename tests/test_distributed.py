"""maxmodel.distributed: which environment is detected from which variables, and start-up in a fresh process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maxmodel.distributed import _cpu_only, detect

ROOT = Path(__file__).resolve().parents[1]


def test_local_launcher_variables_give_explicit_arguments():
    env = {"MAXMODEL_COORDINATOR_ADDRESS": "127.0.0.1:1234", "MAXMODEL_NUM_PROCESSES": "3",
           "MAXMODEL_PROCESS_ID": "2", "SLURM_JOB_ID": "7"}
    plan = detect(env, on_tpu_vm=False)
    assert plan.environment == "local-launcher"
    assert plan.init_kwargs == {"coordinator_address": "127.0.0.1:1234", "num_processes": 3, "process_id": 2,
                                "cluster_detection_method": "deactivate"}


@pytest.mark.parametrize("env, message", [
    ({"MAXMODEL_COORDINATOR_ADDRESS": "h:1", "MAXMODEL_NUM_PROCESSES": "two", "MAXMODEL_PROCESS_ID": "0"},
     "MAXMODEL_NUM_PROCESSES='two'"),
    ({"MAXMODEL_COORDINATOR_ADDRESS": "h:1", "MAXMODEL_NUM_PROCESSES": "2", "MAXMODEL_PROCESS_ID": "2"},
     "MAXMODEL_PROCESS_ID=2"),
    ({"MAXMODEL_COORDINATOR_ADDRESS": "h:1", "MAXMODEL_NUM_PROCESSES": "2"}, "MAXMODEL_PROCESS_ID=None"),
])
def test_bad_launcher_variables_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        detect(env, on_tpu_vm=False)


SLURM = {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_PROCID": "5",
         "SLURM_LOCALID": "1"}


def test_slurm_with_several_tasks_uses_jax_slurm_detection():
    plan = detect({**SLURM, "SLURM_NTASKS": "32"}, on_tpu_vm=False)
    assert (plan.environment, plan.init_kwargs) == ("slurm", {"cluster_detection_method": "slurm"})


def test_slurm_single_task_or_batch_shell_is_a_single_process():
    assert detect({**SLURM, "SLURM_NTASKS": "1"}, on_tpu_vm=False).init_kwargs is None
    no_step = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"} | {"SLURM_NTASKS": "8"}
    assert detect(no_step, on_tpu_vm=False).environment == "single"


def test_gke_tpu_pods_use_jax_gke_detection_only_when_multi_host():
    multi = {"TPU_WORKER_HOSTNAMES": "a,b,c,d", "TPU_WORKER_ID": "1"}
    assert detect(multi, on_tpu_vm=True).init_kwargs == {"cluster_detection_method": "gketpu"}
    one = {"TPU_WORKER_HOSTNAMES": "a", "TPU_WORKER_ID": "0"}
    assert detect(one, on_tpu_vm=True).init_kwargs is None
    two_slices = dict(one, MEGASCALE_NUM_SLICES="2")
    assert detect(two_slices, on_tpu_vm=True).environment == "gke-tpu"
    assert detect(two_slices, on_tpu_vm=True).init_kwargs is not None


def test_jobset_without_tpus_computes_coordinator_and_index():
    env = {"JOBSET_NAME": "run1", "REPLICATED_JOB_NAME": "slice", "JOB_INDEX": "1", "JOB_COMPLETION_INDEX": "2",
           "MAXMODEL_HOSTS_PER_JOB": "4", "MAXMODEL_NUM_JOBS": "2"}
    plan = detect(env, on_tpu_vm=False)
    assert plan.init_kwargs == {"coordinator_address": "run1-slice-0-0.run1:8482", "num_processes": 8,
                                "process_id": 6, "cluster_detection_method": "deactivate"}


def test_tpu_vm_and_plain_host():
    assert detect({}, on_tpu_vm=True).init_kwargs == {"cluster_detection_method": "gcetpu"}
    plain = detect({"HOME": "/root"}, on_tpu_vm=False)
    assert (plain.environment, plain.init_kwargs) == ("single", None)


def test_jax_platforms_decides_cpu_emulation():
    assert _cpu_only({"JAX_PLATFORMS": "cpu"})
    assert not _cpu_only({"JAX_PLATFORMS": "cuda,cpu"})
    assert not _cpu_only({"JAX_PLATFORMS": "tpu"})


PROBE = """
import json, sys
from maxmodel import distributed
a = distributed.initialize(int(sys.argv[1]))
b = distributed.initialize(99)
print(json.dumps({"same": a is b, "main": distributed.is_main_process(), **a.__dict__}))
"""


def _probe(cpu_devices: int, extra_env: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAXMODEL_", "SLURM_", "JOBSET_"))}
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}, **extra_env)
    out = subprocess.run([sys.executable, "-c", PROBE, str(cpu_devices)], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert "maxmodel.distributed: process 0/1 (single)" in out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_initialize_emulates_cpu_devices_and_is_idempotent():
    info = _probe(5, {})
    assert info == {"same": True, "main": True, "process_index": 0, "process_count": 1, "local_device_count": 5,
                    "global_device_count": 5, "coordinator": None, "environment": "single"}


def test_environment_variable_overrides_the_cpu_device_argument():
    assert _probe(5, {"MAXMODEL_CPU_DEVICES": "3"})["global_device_count"] == 3


def test_preemption_request_in_a_single_process():
    code = ("import os, signal\n"
            "from maxmodel import distributed\n"
            "distributed.initialize(1)\n"
            "before = distributed.preemption_requested(0)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "print(before, distributed.preemption_requested(1))\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
