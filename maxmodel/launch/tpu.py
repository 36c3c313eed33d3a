"""`maxmodel launch tpu <create|setup|run|stop|logs|status|delete>`: a job on Cloud TPU VMs through gcloud.

    maxmodel launch tpu create --tpu-type v5p-256 --slices 2 --zone Z --project P --name NAME --spot
    maxmodel launch tpu setup  --slices 2 --zone Z --project P --name NAME [--wheel W | --git URL@REF]
    maxmodel launch tpu run    --tpu-type v5p-256 --slices 2 --zone Z --project P --name NAME -- train ...
    maxmodel launch tpu logs|status|stop|delete --slices 2 --zone Z --project P --name NAME

Every gcloud invocation is printed before it runs; --dry-run prints without running. Several slices always
use a queued resource (`--node-count`/`--node-prefix`; nodes are NAME-0, NAME-1, ...), as multi-slice
requires. `run` starts the command on every worker of every slice (`--worker=all`) in the background with
its output in ~/maxmodel-logs/NAME.log, and sets the MEGASCALE_* variables for multi-slice. Pass the same
--name/--slices/--queued to every subcommand.
"""
from __future__ import annotations

import argparse
import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .catalog import TpuSlice, tpu_slice
from .common import Runner, check_mesh, command_config, require, warn_local_output
from .errors import LaunchError

MEGASCALE_PORT = 8080
VENV = "~/maxmodel-venv"
# Matches the trainer's command line but not the shell running pkill/pgrep (whose line holds "[m]").
PROCESS_PATTERN = "'[m]axmodel-venv/bin/maxmodel'"
LOGS = "~/maxmodel-logs"
SUBCOMMANDS = ("create", "setup", "run", "stop", "logs", "status", "delete")


@dataclass(frozen=True)
class Target:
    name: str
    zone: str
    project: str
    slices: int = 1
    queued: bool = False
    tpu: TpuSlice | None = None
    provisioning: str | None = None      # "spot" | "reserved" | None
    runtime_version: str | None = None

    @property
    def nodes(self) -> list[str]:
        return [self.name] if self.slices == 1 else [f"{self.name}-{i}" for i in range(self.slices)]

    @property
    def uses_queue(self) -> bool:
        return self.queued or self.slices > 1

    def where(self) -> list[str]:
        return [f"--zone={self.zone}", f"--project={self.project}"]

    def ssh(self, node: str, command: str, worker: str = "all") -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *self.where(), f"--worker={worker}",
                f"--command={command}"]


def create_commands(t: Target) -> list[list[str]]:
    if t.tpu is None:
        raise LaunchError("create needs --tpu-type")
    version = t.runtime_version or t.tpu.family.runtime_version
    extra = [f"--{t.provisioning}"] if t.provisioning else []
    if not t.uses_queue:
        return [["gcloud", "compute", "tpus", "tpu-vm", "create", t.name, *t.where(),
                 f"--accelerator-type={t.tpu.name}", f"--version={version}", *extra]]
    nodes = [f"--node-id={t.name}"] if t.slices == 1 else [f"--node-count={t.slices}", f"--node-prefix={t.name}"]
    return [["gcloud", "compute", "tpus", "queued-resources", "create", t.name, *t.where(),
             f"--accelerator-type={t.tpu.name}", f"--runtime-version={version}", *nodes, *extra]]


def setup_script(install: str, python_version: str) -> str:
    """Shell run on every worker: a Python >= 3.12 venv made by uv (TPU images ship an older python3)."""
    return " && ".join([
        "set -e",
        "python3 -m pip install --user --quiet --upgrade uv",
        f"~/.local/bin/uv venv --allow-existing --python {python_version} {VENV}",
        install,
    ])


def setup_commands(t: Target, wheel: str | None, git: str | None, source: Path | None,
                   python_version: str, tarball: str) -> list[list[str]]:
    uv_install = f"~/.local/bin/uv pip install --python {VENV}/bin/python"
    cmds: list[list[str]] = []
    if git:
        install = f"{uv_install} {shlex.quote(f'maxmodel[tpu] @ git+{git}')}"
    elif wheel:
        remote = f"~/{Path(wheel).name}"
        install = f'{uv_install} "maxmodel[tpu] @ file://$HOME/{Path(wheel).name}"'
        cmds += [["gcloud", "compute", "tpus", "tpu-vm", "scp", wheel, f"{node}:{remote}", *t.where(),
                  "--worker=all"] for node in t.nodes]
    else:
        if source is None:
            raise LaunchError("setup: no source checkout to copy (maxmodel is installed from a wheel); "
                              "use --wheel PATH or --git URL@REF")
        cmds.append(["tar", "czf", tarball, "--exclude=.git", "--exclude=.venv", "--exclude=runs",
                     "--exclude=__pycache__", "-C", str(source), "."])
        cmds += [["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{node}:~/maxmodel-src.tgz",
                  *t.where(), "--worker=all"] for node in t.nodes]
        install = (f"rm -rf ~/maxmodel && mkdir -p ~/maxmodel && tar xzf ~/maxmodel-src.tgz -C ~/maxmodel && "
                   f'{uv_install} -e "$HOME/maxmodel[tpu]"')
    script = setup_script(install, python_version)
    return cmds + [t.ssh(node, script) for node in t.nodes]


def coordinator_query(t: Target) -> list[str]:
    """The internal IP of worker 0 of slice 0, which coordinates across slices."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", t.nodes[0], *t.where(),
            "--format=value(networkEndpoints[0].ipAddress)"]


def run_commands(t: Target, command: list[str], coordinator_ip: str | None, foreground: bool) -> list[list[str]]:
    program = f"{VENV}/bin/maxmodel " + shlex.join(command)
    log = f"{LOGS}/{t.name}.log"
    cmds = []
    for slice_id, node in enumerate(t.nodes):
        env = ""
        if t.slices > 1:
            env = (f"MEGASCALE_COORDINATOR_ADDRESS={coordinator_ip}:{MEGASCALE_PORT} "
                   f"MEGASCALE_NUM_SLICES={t.slices} MEGASCALE_SLICE_ID={slice_id} MEGASCALE_PORT={MEGASCALE_PORT} ")
        start = f"mkdir -p {LOGS} && (cd ~/maxmodel 2>/dev/null || cd ~) && "
        if foreground:
            line = f"{start}{env}{program} 2>&1 | tee {log}"
        else:
            line = f"{start}{env}setsid nohup {program} > {log} 2>&1 < /dev/null &"
        cmds.append(t.ssh(node, line))
    return cmds


def stop_commands(t: Target) -> list[list[str]]:
    """SIGTERM: the trainer checkpoints and exits 3."""
    return [t.ssh(node, f"pkill -TERM -f {PROCESS_PATTERN} || true") for node in t.nodes]


def logs_command(t: Target, slice_id: int, worker: int, lines: int, follow: bool) -> list[str]:
    if not 0 <= slice_id < t.slices:
        raise LaunchError(f"--slice must be in 0..{t.slices - 1}, got {slice_id}")
    tail = f"tail -n {lines}{' -f' if follow else ''} {LOGS}/{t.name}.log"
    return t.ssh(t.nodes[slice_id], tail, worker=str(worker))


def status_commands(t: Target) -> list[list[str]]:
    if t.uses_queue:
        cmds = [["gcloud", "compute", "tpus", "queued-resources", "describe", t.name, *t.where()]]
    else:
        cmds = [["gcloud", "compute", "tpus", "tpu-vm", "describe", t.name, *t.where()]]
    check = f"pgrep -af {PROCESS_PATTERN} || echo \"$(hostname): maxmodel not running\""
    return cmds + [t.ssh(node, check) for node in t.nodes]


def delete_commands(t: Target) -> list[list[str]]:
    if t.uses_queue:   # --force deletes the TPU VMs of the queued resource too
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", t.name, *t.where(), "--force", "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", t.name, *t.where(), "--quiet"]]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maxmodel launch tpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=SUBCOMMANDS)
    p.add_argument("--name", help="TPU VM / queued resource name (slices are NAME-0, NAME-1, ...)")
    p.add_argument("--zone", help="zone, e.g. us-east5-a (default: $CLOUDSDK_COMPUTE_ZONE)")
    p.add_argument("--project", help="Google Cloud project (default: $CLOUDSDK_CORE_PROJECT)")
    p.add_argument("--tpu-type", help="accelerator type, e.g. v5p-256, v5litepod-16, v6e-64, v4-32")
    p.add_argument("--slices", type=int, default=1, help="number of slices (multi-slice uses a queued resource)")
    p.add_argument("--queued", action="store_true", help="create through a queued resource")
    capacity = p.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_const", dest="provisioning", const="spot")
    capacity.add_argument("--reserved", action="store_const", dest="provisioning", const="reserved")
    p.add_argument("--runtime-version", help="TPU software version (default: the one for the TPU family)")
    p.add_argument("--wheel", help="setup: install this wheel instead of copying the source checkout")
    p.add_argument("--git", help="setup: install from git, e.g. https://github.com/ORG/maxmodel@v0.1.0")
    p.add_argument("--python-version", default="3.12", help="setup: Python for the workers' venv (default 3.12)")
    p.add_argument("--foreground", action="store_true", help="run: stream the output instead of detaching")
    p.add_argument("--slice", type=int, default=0, help="logs: which slice (default 0)")
    p.add_argument("--worker", type=int, default=0, help="logs: which worker (default 0)")
    p.add_argument("--lines", type=int, default=100, help="logs: lines to show (default 100)")
    p.add_argument("--follow", action="store_true", help="logs: keep following")
    p.add_argument("--dry-run", action="store_true", help="print the gcloud commands without running them")
    return p


def source_checkout() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def main(argv: list[str], command: list[str]) -> int:
    args = parser().parse_args(argv)
    name = require(args.name, "--name")
    zone = require(args.zone, "--zone", "CLOUDSDK_COMPUTE_ZONE")
    project = require(args.project, "--project", "CLOUDSDK_CORE_PROJECT")
    if args.slices < 1:
        raise LaunchError(f"--slices must be >= 1, got {args.slices}")
    tpu = tpu_slice(args.tpu_type) if args.tpu_type else None
    t = Target(name, zone, project, args.slices, args.queued, tpu, args.provisioning, args.runtime_version)
    runner = Runner(args.dry_run)
    if args.action == "create":
        return runner.run(create_commands(t)[0])
    if args.action == "setup":
        tarball = os.path.join(tempfile.gettempdir(), f"maxmodel-src-{name}.tgz")
        cmds = setup_commands(t, args.wheel, args.git, source_checkout(), args.python_version, tarball)
        for cmd in cmds[:-len(t.nodes)]:
            if runner.run(cmd):
                return 1
        return runner.run_all(cmds[-len(t.nodes):])
    if args.action == "run":
        if not command:
            raise LaunchError("run: put the maxmodel command after --, e.g. -- train run.name=x")
        if tpu is None:
            raise LaunchError("run needs --tpu-type (to check the mesh against the slices)")
        cfg = command_config(command)
        check_mesh(cfg, tpu.chips * t.slices, f"{t.slices} x {tpu.name} = {tpu.chips * t.slices} chips",
                   slices=t.slices)
        warn_local_output(cfg, tpu.hosts * t.slices)
        ip = runner.capture(coordinator_query(t), "<IP of worker 0 of slice 0>") if t.slices > 1 else None
        return runner.run_all(run_commands(t, command, ip, args.foreground))
    if args.action == "stop":
        return runner.run_all(stop_commands(t))
    if args.action == "logs":
        return runner.run(logs_command(t, args.slice, args.worker, args.lines, args.follow))
    if args.action == "status":
        return max(runner.run(cmd) for cmd in status_commands(t))
    return runner.run(delete_commands(t)[0])
