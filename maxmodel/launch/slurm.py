"""`maxmodel launch slurm`: render an sbatch script for a GPU cluster and submit it.

    maxmodel launch slurm --nodes 4 --gpus-per-node 8 [--per gpu|node] [--partition P] [--time 24:00:00]
                          [--setup "source ~/venv/bin/activate"] [--dry-run] -- train run.output_dir=/shared/runs

One process per GPU (default; JAX gives each task the GPU numbered by SLURM_LOCALID) or one per node
(each process drives all GPUs of its node; JAX_LOCAL_DEVICE_IDS lists them). `srun` starts the processes;
`maxmodel.distributed.initialize` sees the SLURM_* variables and lets JAX's Slurm detection find the
coordinator (the first node), process count and index. Slurm sends SIGTERM --signal-seconds before the time
limit so the trainer checkpoints and exits 3; with --requeue the job comes back and resumes.
--dry-run prints the script; otherwise it is written to --output (or a temporary file) and `sbatch` runs.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile

from .common import Runner, check_mesh, command_config, render, require
from .errors import LaunchError


def script(name: str, nodes: int, gpus_per_node: int, command: list[str], per: str = "gpu",
           partition: str | None = None, account: str | None = None, time_limit: str | None = None,
           setup: str = "", python: str = "python", requeue: bool = False, signal_seconds: int = 120,
           log: str = "%x-%j.out", platform: str = "cuda") -> str:
    if per not in ("gpu", "node"):
        raise LaunchError(f"--per must be gpu or node, got {per!r}")
    tasks_per_node = gpus_per_node if per == "gpu" else 1
    extra = [f"#SBATCH --partition={partition}"] if partition else []
    extra += [f"#SBATCH --account={account}"] if account else []
    extra += [f"#SBATCH --time={time_limit}"] if time_limit else []
    extra += ["#SBATCH --requeue"] if requeue else []
    # One process per node must see every GPU of it; JAX's Slurm detection would otherwise keep only the GPU
    # numbered by the task's local id.
    device_env = ("export JAX_LOCAL_DEVICE_IDS=" + ",".join(str(i) for i in range(gpus_per_node))
                  if per == "node" else "")
    text = render("sbatch.sh.tmpl", name=name, nodes=nodes, gpus_per_node=gpus_per_node, per=per,
                  tasks=nodes * tasks_per_node, tasks_per_node=tasks_per_node, log=log,
                  signal_seconds=signal_seconds, sbatch_extra="\n".join(extra), setup=setup,
                  device_env=device_env, platform=platform, python=python, command=shlex.join(command))
    # Drop the blank lines left by empty optional parts, keeping the script tidy.
    return "\n".join(line for line in text.splitlines() if line.strip()) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maxmodel launch slurm", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, help="GPUs on each node")
    p.add_argument("--per", choices=("gpu", "node"), default="gpu", help="one process per GPU or per node")
    p.add_argument("--name", default="maxmodel", help="Slurm job name (default maxmodel)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", dest="time_limit", help="time limit, e.g. 24:00:00")
    p.add_argument("--setup", default="", help="shell run before srun, e.g. 'source ~/maxmodel/.venv/bin/activate'")
    p.add_argument("--python", default="python", help="interpreter on the nodes (default: python on PATH)")
    p.add_argument("--platform", default="cuda", help="JAX_PLATFORMS on the nodes (default cuda)")
    p.add_argument("--requeue", action="store_true", help="let Slurm requeue the job after preemption")
    p.add_argument("--signal-seconds", type=int, default=120,
                   help="SIGTERM this long before the time limit, for the final checkpoint (default 120)")
    p.add_argument("--log", default="%x-%j.out", help="sbatch --output pattern (default %%x-%%j.out)")
    p.add_argument("--output", help="also write the script here")
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command only")
    return p


def main(argv: list[str], command: list[str]) -> int:
    args = parser().parse_args(argv)
    nodes = require(args.nodes, "--nodes")
    gpus = require(args.gpus_per_node, "--gpus-per-node")
    if nodes < 1 or gpus < 1:
        raise LaunchError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus}")
    if not command:
        raise LaunchError("put the maxmodel command after --, e.g. -- train run.name=x")
    cfg = command_config(command)
    check_mesh(cfg, nodes * gpus, f"{nodes} nodes x {gpus} GPUs = {nodes * gpus} devices")
    text = script(args.name, nodes, gpus, command, args.per, args.partition, args.account, args.time_limit,
                  args.setup, args.python, args.requeue, args.signal_seconds, args.log, args.platform)
    path = args.output
    if path:
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
    if args.dry_run:
        sys.stdout.write(text)
        Runner(True, out=sys.stderr).show(["sbatch", path or f"{args.name}.sbatch"])
        return 0
    if not path:
        fd, path = tempfile.mkstemp(prefix=f"{args.name}-", suffix=".sbatch")
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return Runner(False).run(["sbatch", path])
