"""A run's checkpoints: orbax CheckpointManagers with async saves, retention, integrity manifests, fallback
past damaged checkpoints, and optional emergency checkpoints on a fast local disk.

One step holds four items: `params`, `opt_state` (optimizer state with the loss-guard counters), `data` (the
data iterator's state) and `meta` (step, resolved config, metrics snapshot, seed). Arrays are written by
tensorstore, so `checkpoint.dir` may be a local path or a gs:// URL. Restores place every array with the
current run's shardings, so a checkpoint written under one mesh loads under another.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from maxmodel import jsonio
from maxmodel.config.schema import CheckpointConfig

log = logging.getLogger("maxmodel.checkpoint")

ITEMS = ("params", "opt_state", "data", "meta")
MANIFEST = "maxmodel_manifest.json"   # written next to orbax's files once a step has committed
DAMAGED = "damaged"                   # damaged steps are moved here, never deleted


def as_path(directory) -> epath.Path:
    """gs:// and other URLs stay as they are; local paths become absolute (orbax needs them so)."""
    text = str(directory)
    return epath.Path(text) if "://" in text else epath.Path(text).absolute()


def abstract_like(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what StandardRestore reshards onto)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _manager(directory: epath.Path, keep: int, keep_every: int, use_async: bool) -> ocp.CheckpointManager:
    keep_policy = policies.LatestN(keep)
    if keep_every:  # permanent steps on top of the rolling window
        keep_policy = policies.AnyPreservationPolicy([keep_policy, policies.EveryNSteps(keep_every)])
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=use_async, create=True,
                                           preservation_policy=keep_policy)
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


# ---- integrity manifests: every file of a committed step with its size ----

def _files(root: epath.Path, prefix: str = "") -> dict[str, int]:
    """{relative path: size} of every file under `root` (one listing per directory, also on GCS)."""
    out = {}
    for path in root.iterdir():
        name = f"{prefix}{path.name}"
        if path.is_dir():
            out.update(_files(path, name + "/"))
        elif name != MANIFEST:
            out[name] = path.stat().length
    return out


def write_manifest(step_dir: epath.Path) -> None:
    (step_dir / MANIFEST).write_text(jsonio.dumps({"files": _files(step_dir)}, indent=0))


def check_manifest(step_dir: epath.Path) -> str | None:
    """None if every recorded file is there with its recorded size, else what is wrong. A step without a
    manifest (the process died before writing it) is reported as 'unverified'."""
    manifest = step_dir / MANIFEST
    if not manifest.exists():
        return "unverified"
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    found = _files(step_dir)
    for name, size in sorted(expected.items()):
        if name not in found:
            return f"missing file {name}"
        if found[name] != size:
            return f"{name} has {found[name]} bytes, expected {size} (truncated?)"
    return None


def restore_params(ckpt_dir, target, step: int | None = None, key: str = "checkpoint.dir"):
    """(step, parameters) of a run's checkpoint (the latest by default) restored onto `target`, alone: no
    optimizer state. For `maxmodel export` and for generating from a run directory; a missing or damaged
    checkpoint is a ConfigError naming `key` (or --step)."""
    from maxmodel.config.errors import ConfigError
    ckpt_dir = as_path(ckpt_dir)
    manager = ocp.CheckpointManager(ckpt_dir, item_names=ITEMS, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise ConfigError(key, f"no checkpoints in {ckpt_dir}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ConfigError("--step", f"no checkpoint at step {step} in {ckpt_dir}; there are {steps}")
        problem = check_manifest(ckpt_dir / str(step))
        if problem not in (None, "unverified"):
            raise ConfigError("--step", f"checkpoint {ckpt_dir / str(step)} is damaged: {problem}")
        return step, manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
    finally:
        manager.close()


@dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any
    data: dict
    meta: dict
    directory: str


class Checkpointer:
    """Saves to `checkpoint.dir` (persistent) and, when configured, to `checkpoint.local_dir` (emergency,
    more often); restores the newest valid step of the two."""

    def __init__(self, cfg: CheckpointConfig, default_dir, clock=time.monotonic):
        self.cfg, self.clock = cfg, clock
        self.multihost = jax.process_count() > 1
        if cfg.local_dir and self.multihost:
            from maxmodel.config.errors import ConfigError
            raise ConfigError("checkpoint.local_dir", "emergency local checkpoints are single-host only: each "
                                                      "host's disk would hold a part of every array")
        self.persistent = _manager(as_path(cfg.dir or default_dir), cfg.keep, cfg.keep_every, cfg.async_)
        self.local = (_manager(as_path(cfg.local_dir), cfg.local_keep, 0, cfg.async_)
                      if cfg.local_dir else None)
        self._last_save_time = clock()
        self._unverified: list[tuple[ocp.CheckpointManager, int]] = []  # saved, manifest not yet written

    @property
    def managers(self) -> list[ocp.CheckpointManager]:
        return [m for m in (self.persistent, self.local) if m is not None]

    # ---- saving ----

    def due(self, step: int, last_step: int, force: bool = False) -> list[ocp.CheckpointManager]:
        """The managers that should save `step`: on the step or minute interval, at the last step, or when
        forced (preemption, loss guard). A forced save goes to persistent storage."""
        c = self.cfg
        timed = c.every_minutes > 0 and self.clock() - self._last_save_time >= 60 * c.every_minutes
        if timed and self.multihost:  # hosts' clocks differ: process 0 decides for all
            from jax.experimental import multihost_utils
            timed = bool(multihost_utils.broadcast_one_to_all(np.int32(timed)))
        out = []
        if force or timed or step == last_step or (c.every_steps and step % c.every_steps == 0):
            out.append(self.persistent)
        if self.local is not None and step % c.local_every_steps == 0:
            out.append(self.local)
        return [m for m in out if step not in m.all_steps()]  # e.g. a forced save on a periodic step

    def save(self, step: int, managers: list, params, opt_state, data_state: dict | None, meta: dict) -> None:
        args = ocp.args.Composite(params=ocp.args.StandardSave(params),
                                  opt_state=ocp.args.StandardSave(opt_state),
                                  data=ocp.args.JsonSave(jsonio.to_jsonable(data_state or {})),
                                  # orbax writes these with json.dumps: a NaN loss in the metrics
                                  # snapshot would make the file unreadable to strict readers
                                  meta=ocp.args.JsonSave(jsonio.to_jsonable(
                                      {**meta, "step": step, "saved_at": time.time()})))
        for manager in managers:
            # save() first waits for this manager's previous async save: those steps have now committed.
            manager.save(step, args=args, force=True)
            self._write_manifests(manager, in_flight=step)
            self._unverified.append((manager, step))
        if self.persistent in managers:
            self._last_save_time = self.clock()

    def wait(self) -> None:
        """Block until every save has committed (and its manifest is written)."""
        for manager in self.managers:
            manager.wait_until_finished()
            self._write_manifests(manager)

    def close(self) -> None:
        self.wait()
        for manager in self.managers:
            manager.close()

    def _write_manifests(self, manager, in_flight: int | None = None) -> None:
        """Manifests for `manager`'s committed steps (all it saved but `in_flight`)."""
        pending = []
        for m, step in self._unverified:
            if m is not manager or step == in_flight:
                pending.append((m, step))
            elif jax.process_index() == 0 and step in m.all_steps():  # (retention may have removed it)
                try:
                    write_manifest(m.directory / str(step))
                except OSError as e:  # a manifest is a safeguard; its absence only means "unverified"
                    log.warning("could not write the manifest of %s/%d: %s", m.directory, step, e)
        self._unverified = pending

    # ---- restoring ----

    def candidates(self) -> list[tuple[int, ocp.CheckpointManager]]:
        """(step, manager), newest first; persistent before local on equal steps."""
        out = [(s, m) for m in self.managers for s in m.all_steps()]
        return sorted(out, key=lambda sm: (-sm[0], sm[1] is not self.persistent))

    def restore_latest(self, target: dict) -> Restored | None:
        """The newest step that is intact, restored onto `target` ({"params", "opt_state"} abstract trees with
        shardings). Damaged steps are reported, moved to `<dir>/damaged/` and skipped; None if there is none."""
        for step, manager in self.candidates():
            step_dir = manager.directory / str(step)
            problem = check_manifest(step_dir)
            if problem not in (None, "unverified"):
                self._set_aside(manager, step, problem)
                continue
            try:
                out = manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(target["params"]),
                    opt_state=ocp.args.StandardRestore(target["opt_state"]),
                    data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
            except Exception as e:  # decided below: damage, or a real error to pass on
                if problem is None:  # the files are all there and intact: not damage but a mismatch
                    raise RuntimeError(f"checkpoint {step_dir} is intact but does not restore into this run "
                                       f"(did the model or optimizer config change?): {e}") from e
                self._set_aside(manager, step, f"cannot be read ({type(e).__name__}: {e})")
                continue
            return Restored(step, out.params, out.opt_state, dict(out.data or {}), dict(out.meta or {}),
                            str(manager.directory))
        return None

    def _set_aside(self, manager: ocp.CheckpointManager, step: int, problem: str) -> None:
        src = manager.directory / str(step)
        dest = manager.directory / DAMAGED / str(step)
        n = 1
        while dest.exists():
            dest, n = manager.directory / DAMAGED / f"{step}.{n}", n + 1
        log.warning("checkpoint %s is damaged: %s; moved to %s (kept for inspection); falling back to the "
                    "previous checkpoint", src, problem, dest)
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            src.rename(dest)
        if self.multihost:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"maxmodel_set_aside_{step}")
        manager.reload()
