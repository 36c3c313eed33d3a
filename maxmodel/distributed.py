"""Start JAX's distributed runtime from whatever environment launched this process.

Every entry point calls `initialize()` once, before anything touches a JAX backend. It
  1. on a host without an accelerator, splits the CPU into emulated devices (MAXMODEL_CPU_DEVICES, else the
     `cpu_devices` argument, i.e. `run.cpu_devices`);
  2. finds out how the job was launched and calls `jax.distributed.initialize` to match:
       local launcher  MAXMODEL_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID (`maxmodel launch local`,
                       or any launcher that sets them)
       slurm           srun with more than one task (SLURM_* variables; JAX's own Slurm detection)
       gke-tpu         a GKE TPU pod (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES; JAX's detection, with
                       MEGASCALE_* across slices, as set by the JobSet from `maxmodel launch gke`)
       jobset          a JobSet pod without TPUs (JOBSET_NAME, REPLICATED_JOB_NAME, JOB_INDEX,
                       JOB_COMPLETION_INDEX, MAXMODEL_HOSTS_PER_JOB, MAXMODEL_NUM_JOBS)
       tpu-vm          a Cloud TPU VM (JAX's cluster detection reads the VM metadata, and MEGASCALE_* for
                       multi-slice)
       single          none of these: one process, no distributed runtime
  3. logs process index/count and local/global device counts.
Only process 0 writes logs, metrics and configs (`is_main_process()`); every process joins checkpoints.
`preemption_requested(step)` tells a training loop, on every process at the same step, that SIGTERM arrived.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# The variables `maxmodel launch local` sets for each child.
ENV_COORDINATOR = "MAXMODEL_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MAXMODEL_NUM_PROCESSES"
ENV_PROCESS_ID = "MAXMODEL_PROCESS_ID"
ENV_CPU_DEVICES = "MAXMODEL_CPU_DEVICES"
JOBSET_PORT = 8482   # the port JAX's TPU detection uses too


@dataclass(frozen=True)
class ProcessInfo:
    process_index: int
    process_count: int
    local_device_count: int
    global_device_count: int
    coordinator: str | None = None
    environment: str = "single"


@dataclass(frozen=True)
class Plan:
    """How to start the runtime: `init_kwargs` for jax.distributed.initialize, or None for one process."""
    environment: str
    init_kwargs: dict | None = field(default=None)


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        raise ValueError(f"environment variable {key}={env.get(key)!r} must be an integer") from None


def detect(env: Mapping[str, str], on_tpu_vm: bool) -> Plan:
    """Pick the launch environment from the variables in `env` (pure: no JAX, no network)."""
    if env.get(ENV_COORDINATOR):
        count, index = _int(env, ENV_NUM_PROCESSES), _int(env, ENV_PROCESS_ID)
        if not 0 <= index < count:
            raise ValueError(f"{ENV_PROCESS_ID}={index} is outside 0..{ENV_NUM_PROCESSES}-1={count - 1}")
        # All four arguments given and detection off: a Slurm or TPU environment around a local rehearsal
        # must not override them.
        return Plan("local-launcher", {"coordinator_address": env[ENV_COORDINATOR], "num_processes": count,
                                        "process_id": index, "cluster_detection_method": "deactivate"})
    slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in env for v in slurm_vars) and _int(env, "SLURM_NTASKS") > 1:
        # One srun task alone (e.g. `srun -n1` in an allocation) runs as a plain single process: JAX's Slurm
        # detection would otherwise pin it to the GPU numbered by its local task id.
        return Plan("slurm", {"cluster_detection_method": "slurm"})
    if on_tpu_vm and (env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES")
                      or env.get("TPU_PROCESS_ADDRESSES_PATH")):
        hosts = len((env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or "x,x").split(","))
        slices = int(env.get("MEGASCALE_NUM_SLICES") or 1)
        if hosts * slices == 1:
            return Plan("gke-tpu")
        return Plan("gke-tpu", {"cluster_detection_method": "gketpu"})
    if env.get("JOBSET_NAME") and not on_tpu_vm:
        per_job, jobs = _int(env, "MAXMODEL_HOSTS_PER_JOB"), _int(env, "MAXMODEL_NUM_JOBS")
        index = _int(env, "JOB_INDEX") * per_job + _int(env, "JOB_COMPLETION_INDEX")
        if per_job * jobs == 1:
            return Plan("jobset")
        # Pod 0 of job 0 hosts the coordinator; JobSet's headless service gives it this DNS name.
        name, job = env["JOBSET_NAME"], env.get("REPLICATED_JOB_NAME", "slice")
        coordinator = f"{name}-{job}-0-0.{name}:{env.get('JAX_COORDINATOR_PORT', JOBSET_PORT)}"
        return Plan("jobset", {"coordinator_address": coordinator, "num_processes": per_job * jobs,
                                "process_id": index, "cluster_detection_method": "deactivate"})
    if on_tpu_vm:
        # JAX reads the worker list and worker number from the TPU VM metadata (one host gives one process).
        return Plan("tpu-vm", {"cluster_detection_method": "gcetpu"})
    return Plan("single")


def _on_tpu_vm() -> bool:
    """JAX's own check, made when `jax` is imported: libtpu present and TPU chips on the PCI bus."""
    try:
        from jax._src import cloud_tpu_init
        return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
    except (ImportError, AttributeError):   # a JAX without this module: the device files TPU VMs expose
        import glob
        return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _cpu_only(env: Mapping[str, str]) -> bool:
    """True when JAX will run on the CPU: JAX_PLATFORMS says so, or no accelerator is attached."""
    platforms = [p.strip() for p in (env.get("JAX_PLATFORMS") or "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    if _on_tpu_vm():
        return False
    try:
        from jax._src import hardware_utils as hw
        return not (hw.has_visible_nvidia_gpu() or hw.num_available_amd_gpus(stop_at=1))
    except (ImportError, AttributeError, OSError):
        return not any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd"))


_INFO: ProcessInfo | None = None


def _emulate_cpu_devices(cpu_devices: int | None) -> None:
    import jax

    text = os.environ.get(ENV_CPU_DEVICES)
    if text:
        try:
            count = int(text)
        except ValueError:
            raise ValueError(f"environment variable {ENV_CPU_DEVICES}={text!r} must be an integer") from None
    else:
        count = cpu_devices
    if not _cpu_only(os.environ):
        return
    if not os.environ.get("JAX_PLATFORMS"):
        # No accelerator attached: do not let JAX probe an installed libtpu / CUDA plugin (slow, noisy).
        jax.config.update("jax_platforms", "cpu")
    if not count:
        return
    if count < 1:
        raise ValueError(f"the number of emulated CPU devices must be >= 1, got {count}")
    if count > 1 and not (os.environ.get("PJRT_NPROC") or os.environ.get("NPROC")):
        # XLA:CPU sizes its thread pools max(cores, devices), and each emulated device blocks a pool thread
        # in every collective's rendezvous: with only as many threads as devices (a 2-core host) little is
        # left for the compute another device still needs. A 2-core CI run hung once in an 8-device step.
        os.environ["PJRT_NPROC"] = str(max(os.cpu_count() or 1, 4 * count))
    try:
        jax.config.update("jax_num_cpu_devices", int(count))
    except RuntimeError as e:   # a backend already exists: its device count is fixed now
        log.warning("cannot emulate %d CPU devices: %s", count, e)


def _report(info: ProcessInfo) -> None:
    where = f", coordinator {info.coordinator}" if info.coordinator else ""
    message = (f"process {info.process_index}/{info.process_count} ({info.environment}{where}): "
               f"{info.local_device_count} local devices, {info.global_device_count} global devices")
    if log.hasHandlers():
        log.info(message)
    else:   # no logging set up yet: still say once where this process sits
        print(f"maxmodel.distributed: {message}", file=sys.stderr, flush=True)


def initialize(cpu_devices: int | None = None) -> ProcessInfo:
    """Set up devices and the distributed runtime for this process; a second call returns the same info."""
    global _INFO
    if _INFO is not None:
        return _INFO
    import jax

    _emulate_cpu_devices(cpu_devices)
    if jax.distributed.is_initialized():
        plan = Plan("preinitialized")
    else:
        plan = detect(os.environ, _on_tpu_vm())
        if plan.init_kwargs is not None:
            jax.distributed.initialize(**plan.init_kwargs)
    coordinator = None
    if jax.distributed.is_initialized():
        from jax._src import distributed as jax_distributed
        coordinator = jax_distributed.global_state.coordinator_address
    _INFO = ProcessInfo(process_index=jax.process_index(), process_count=jax.process_count(),
                        local_device_count=jax.local_device_count(), global_device_count=jax.device_count(),
                        coordinator=coordinator, environment=plan.environment)
    _report(_INFO)
    return _INFO


def is_main_process() -> bool:
    """Process 0 writes logs, metrics and configs; the others stay quiet."""
    if _INFO is not None:
        return _INFO.process_index == 0
    import jax
    return jax.process_index() == 0


_SIGTERM = threading.Event()
_HANDLER_INSTALLED = False


def _on_sigterm(signum, frame):
    _SIGTERM.set()


def watch_sigterm() -> None:
    """From now on SIGTERM sets the flag `preemption_requested` reads instead of killing this process.

    Single process only (with the distributed runtime up, JAX's preemption notifier owns SIGTERM); signal
    handlers need the main thread, so elsewhere this does nothing.
    """
    global _HANDLER_INSTALLED
    import jax

    if (not _HANDLER_INSTALLED and not jax.distributed.is_initialized()
            and threading.current_thread() is threading.main_thread()):
        signal.signal(signal.SIGTERM, _on_sigterm)
        _HANDLER_INSTALLED = True


def preemption_requested(step: int) -> bool:
    """Call once per step on every process: True once SIGTERM has arrived, so the loop checkpoints and exits 3.

    With the distributed runtime up, JAX's preemption notifier has taken SIGTERM and
    `reached_preemption_sync_point` makes all processes answer True at the same step (hosts that stopped at
    different steps would wait for each other's checkpoint forever). In a single process the handler of
    `watch_sigterm` (installed by the first call at the latest) records the signal.
    """
    import jax

    if jax.distributed.is_initialized():
        from jax.experimental import multihost_utils
        return bool(multihost_utils.reached_preemption_sync_point(step))
    watch_sigterm()
    return _SIGTERM.is_set()
