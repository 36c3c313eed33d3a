"""Pieces every launch target shares: the `--` split, printing/running commands, templates, the mesh check."""
from __future__ import annotations

import os
import shlex
import string
import subprocess
import sys
from importlib import resources

from .errors import LaunchError

MESH_AXES = ("data", "stage", "fsdp", "sequence", "tensor", "expert")
CONFIG_COMMANDS = ("train", "finetune")   # maxmodel commands whose config fixes a mesh


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """`[launcher flags] -- [the command]` → (launcher flags, command)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return list(argv), []


def require(value, flag: str, env: str | None = None):
    """A required flag, optionally defaulted from an environment variable (gcloud's own, for example)."""
    if value in (None, "") and env:
        value = os.environ.get(env) or None
    if value in (None, ""):
        raise LaunchError(f"missing {flag}" + (f" (or set {env})" if env else ""))
    return value


class Runner:
    """Prints every command as a copy-pasteable line; runs it unless this is a dry run."""

    def __init__(self, dry_run: bool, out=None):
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def show(self, cmd: list[str]) -> None:
        print("+ " + shlex.join(cmd), file=self.out, flush=True)

    def run(self, cmd: list[str]) -> int:
        self.show(cmd)
        if self.dry_run:
            return 0
        return subprocess.run(cmd, check=False).returncode

    def run_all(self, cmds: list[list[str]]) -> int:
        """Run commands side by side (one per slice); the result is the first non-zero exit code."""
        for cmd in cmds:
            self.show(cmd)
        if self.dry_run:
            return 0
        procs = [subprocess.Popen(cmd) for cmd in cmds]
        codes = [p.wait() for p in procs]
        return next((c for c in codes if c), 0)

    def capture(self, cmd: list[str], placeholder: str) -> str:
        """The stripped stdout of a query; in a dry run, `placeholder` stands in for it."""
        self.show(cmd)
        if self.dry_run:
            return placeholder
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout.strip()


def render(template: str, **values) -> str:
    """Fill `maxmodel/launch/templates/<template>`; a missing value is a programming error (KeyError)."""
    text = resources.files("maxmodel.launch.templates").joinpath(template).read_text()
    return string.Template(text).substitute(values)


def command_config(command: list[str]):
    """The resolved config of `train [CONFIG.yaml] [key=value ...]`, or None for other commands.

    Loading it here means a bad key or a mesh that cannot fit fails on the laptop, before any machine starts.
    """
    if not command or command[0] not in CONFIG_COMMANDS:
        return None
    from maxmodel.config import load_config

    positional = [a for a in command[1:] if not a.startswith("-")]
    config_file = positional[0] if positional and "=" not in positional[0] else None
    overrides = [a for a in positional if "=" in a]
    return load_config(config_file, overrides)


def _fit(sizes: dict[str, int], devices: int, what: str) -> None:
    """Mesh sizes (keyed by their config key; -1 = fill) must multiply to `devices` exactly, or divide it
    when one of them is -1."""
    product = 1
    for v in sizes.values():
        product *= 1 if v == -1 else v
    fills = any(v == -1 for v in sizes.values())
    if (not fills and product == devices) or (fills and devices % product == 0):
        return
    named = [k for k, v in sizes.items() if v not in (1, -1)] or list(sizes)
    shown = " ".join(f"{k}={v}" for k, v in sizes.items() if v != 1)
    need = f"divide {devices}" if fills else f"multiply to {devices}"
    raise LaunchError(f"{named[0]}: the mesh ({shown or 'all sizes 1'}) does not fit {what}: "
                      f"its sizes must {need}")


def check_mesh(cfg, devices: int, what: str, slices: int | None = None) -> None:
    """Check that the config's mesh fits the devices the launch provides.

    With `slices` (TPU multi-slice), `mesh.dcn.*` must cover the slices and `mesh.*` one slice; otherwise
    (one slice, as build_mesh sees GPUs and CPUs) `mesh.dcn.*` must be 1 or -1 and `mesh.*` cover `devices`.
    """
    if cfg is None:
        return
    ici = {f"mesh.{a}": getattr(cfg.mesh, a) for a in MESH_AXES}
    dcn = {f"mesh.dcn.{a}": getattr(cfg.mesh.dcn, a) for a in MESH_AXES}
    if slices is None:
        _fit(dcn, 1, f"one slice ({what}; mesh.dcn.* sizes are for multi-slice TPU)")
        _fit(ici, devices, what)
        return
    _fit(dcn, slices, f"{slices} slice(s)")
    _fit(ici, devices // slices, f"one slice of {devices // slices} chips ({what})")


def warn_local_output(cfg, hosts: int) -> None:
    """Every host writes its part of a checkpoint, so a multi-host run needs storage all hosts share."""
    if cfg is not None and hosts > 1 and not cfg.run.output_dir.startswith("gs://"):
        print(f"maxmodel launch: warning: run.output_dir={cfg.run.output_dir!r} is not gs://; all {hosts} hosts "
              f"must see the same directory for checkpoints and resume", file=sys.stderr)
