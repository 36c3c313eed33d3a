"""`maxmodel launch gke`: render a JobSet for TPU slices on GKE and apply it with kubectl.

    maxmodel launch gke --tpu-type v5p-256 --slices 2 --name NAME --image IMAGE [--dry-run] -- train ...

The manifest (templates/jobset.yaml.tmpl) has one replicated Job per slice (replicas = slices), each with
parallelism = completions = hosts per slice, one pod per TPU VM requesting its chips as `google.com/tpu`,
node selectors for the accelerator and topology, and for multi-slice the MEGASCALE_* variables (coordinator:
pod 0 of slice 0). GKE's TPU webhook adds TPU_WORKER_ID / TPU_WORKER_HOSTNAMES, from which JAX (through
`maxmodel.distributed.initialize`) finds the other hosts. --dry-run prints the manifest; otherwise it is
written to --output (or a temporary file) and `kubectl apply -f` runs. The cluster needs the JobSet
controller and TPU node pools (or Autopilot) of the matching type and topology.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

from maxmodel import jsonio

from .catalog import TpuSlice, tpu_slice
from .common import Runner, check_mesh, command_config, render, require, warn_local_output
from .errors import LaunchError

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
ENV_INDENT = " " * 14


def _env(name: str, value: str | None = None, field: str | None = None) -> str:
    if field:
        return (f"{ENV_INDENT}- name: {name}\n{ENV_INDENT}  valueFrom:\n{ENV_INDENT}    fieldRef:\n"
                f"{ENV_INDENT}      fieldPath: {field}\n")
    return f"{ENV_INDENT}- name: {name}\n{ENV_INDENT}  value: {jsonio.dumps(value)}\n"


def manifest(name: str, tpu: TpuSlice, slices: int, image: str, command: list[str], namespace: str = "default",
             spot: bool = False, max_restarts: int = 3, grace_seconds: int = 120) -> str:
    if not NAME_RE.match(name) or len(name) > 40:
        # Pod host names are <name>-slice-<job>-<pod>; DNS labels stop at 63 characters.
        raise LaunchError(f"--name: '{name}' must be lower-case letters, digits and '-', at most 40 characters")
    megascale = ""
    if slices > 1:
        megascale = (_env("MEGASCALE_COORDINATOR_ADDRESS", f"{name}-slice-0-0.{name}")
                     + _env("MEGASCALE_NUM_SLICES", str(slices))
                     + _env("MEGASCALE_SLICE_ID", field="metadata.annotations['jobset.sigs.k8s.io/job-index']"))
    selectors = f'{ENV_INDENT}cloud.google.com/gke-spot: "true"\n' if spot else ""
    return render("jobset.yaml.tmpl", name=name, namespace=namespace, slices=slices, tpu_type=tpu.name,
                  topology=tpu.topology, hosts=tpu.hosts, accelerator=tpu.family.gke_accelerator,
                  chips_per_host=tpu.chips_per_host, image=image, command=jsonio.dumps(["maxmodel", *command]),
                  max_restarts=max_restarts, grace_seconds=grace_seconds, extra_selectors=selectors,
                  megascale_env=megascale)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maxmodel launch gke", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", help="JobSet name (lower case, digits, '-')")
    p.add_argument("--tpu-type", help="accelerator type, e.g. v5p-256, v5litepod-16, v6e-64, v4-32")
    p.add_argument("--slices", type=int, default=1)
    p.add_argument("--image", help="container image with maxmodel[tpu] installed")
    p.add_argument("--namespace", default="default")
    p.add_argument("--spot", action="store_true", help="schedule on Spot TPU nodes")
    p.add_argument("--max-restarts", type=int, default=3, help="JobSet restarts after a failure (default 3)")
    p.add_argument("--grace-seconds", type=int, default=120,
                   help="time between SIGTERM and SIGKILL, for the final checkpoint (default 120)")
    p.add_argument("--output", help="also write the manifest here")
    p.add_argument("--dry-run", action="store_true", help="print the manifest and the kubectl command only")
    return p


def main(argv: list[str], command: list[str]) -> int:
    args = parser().parse_args(argv)
    name = require(args.name, "--name")
    tpu = tpu_slice(require(args.tpu_type, "--tpu-type"))
    image = require(args.image, "--image")
    if args.slices < 1:
        raise LaunchError(f"--slices must be >= 1, got {args.slices}")
    if not command:
        raise LaunchError("put the maxmodel command after --, e.g. -- train run.name=x")
    cfg = command_config(command)
    check_mesh(cfg, tpu.chips * args.slices, f"{args.slices} x {tpu.name} = {tpu.chips * args.slices} chips",
               slices=args.slices)
    warn_local_output(cfg, tpu.hosts * args.slices)
    text = manifest(name, tpu, args.slices, image, command, args.namespace, args.spot, args.max_restarts,
                    args.grace_seconds)
    path = args.output
    if path:
        with open(path, "w") as f:
            f.write(text)
    if args.dry_run:
        sys.stdout.write(text)   # stdout stays a valid manifest; the command goes to stderr
        Runner(True, out=sys.stderr).show(["kubectl", "apply", "-f", path or f"{name}.yaml"])
        return 0
    if not path:
        fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write(text)
    code = Runner(False).run(["kubectl", "apply", "-f", path])
    if code == 0:
        print(f"logs:   kubectl logs -f -n {args.namespace} {name}-slice-0-0-<suffix>  "
              f"(kubectl get pods -n {args.namespace} -l jobset.sigs.k8s.io/jobset-name={name})\n"
              f"delete: kubectl delete jobset -n {args.namespace} {name}")
    return code
