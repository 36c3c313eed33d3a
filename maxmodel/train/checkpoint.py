"""orbax CheckpointManager: train state (params + optimizer state), data-iterator state, config, step.

Restores onto whatever mesh the current run uses: the target carries this run's shardings, so a checkpoint
written under one layout loads under another.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("maxmodel.checkpoint")


class Checkpointer:
    def __init__(self, directory: Path, keep: int, every_steps: int, use_async: bool):
        self.every_steps = every_steps
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async,
                                                 create=True),
            item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int, last_step: int) -> bool:
        return step % self.every_steps == 0 or step == last_step

    def save(self, step: int, state: dict, data_state: dict | None, meta: dict, force: bool = False) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state or {}),
                                  meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[dict, dict, dict]:
        """(state, data_state, meta) at `step`, placed with the shardings of `abstract_state`."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out.state, out.data, out.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what StandardRestore reshards onto)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
