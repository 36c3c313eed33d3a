"""`maxmodel launch <target> [flags] -- <maxmodel command>`; see launch/README.md for the full walk-through."""
from __future__ import annotations

import importlib
import sys

from .common import split_command
from .errors import LaunchError

TARGETS = {
    "local": ("maxmodel.launch.local", "N processes on this machine with emulated CPU devices (a rehearsal)"),
    "tpu": ("maxmodel.launch.tpu", "Cloud TPU VMs / queued resources: create, setup, run, logs, status, delete"),
    "gke": ("maxmodel.launch.gke", "render a JobSet for TPU slices on GKE and kubectl apply it"),
    "slurm": ("maxmodel.launch.slurm", "render an sbatch script for a GPU cluster and submit it"),
}


def usage() -> str:
    lines = ["usage: maxmodel launch <target> [flags] -- <maxmodel command, e.g. train key=value ...>", "",
             "targets:"]
    lines += [f"  {name:<7} {help_}" for name, (_, help_) in TARGETS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from maxmodel.config.errors import ConfigError

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    target, rest = argv[0], argv[1:]
    if target not in TARGETS:
        print(f"maxmodel launch: unknown target '{target}'\n\n{usage()}", file=sys.stderr)
        return 2
    own, command = split_command(rest)
    module = importlib.import_module(TARGETS[target][0])
    try:
        return int(module.main(own, command) or 0)
    except (LaunchError, ConfigError) as e:
        print(f"maxmodel launch {target}: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:   # argparse: --help is 0, bad usage is 2
        return e.code if isinstance(e.code, int) else 2
