"""Orbax parameter trees written and read a slice at a time, so converting a checkpoint never holds it whole.

Orbax saves and restores whole leaves, and a scanned model's leaf is every layer's copy of a weight stacked
(LLaMA 3 70B's stacked MLP matrix alone is 75 GB in float32). Both directions therefore go through Orbax's
own extension point, a TypeHandler in a registry of our own (the global one is left alone):

- `save_streamed` writes leaves given as `Streamed` (shape, dtype and a generator of (index, slice)). Each
  leaf is stored exactly as Orbax's numpy handler stores an array (same tensorstore spec, typestr
  `np.ndarray`), chunked one slice per chunk, so any Orbax restore reads it back; the slices are written one
  after another and dropped.
- `open_lazy` restores a saved tree as opened tensorstore arrays without reading them: indexing one and
  reading it (`read(store, index)`, or `fetch` to start the read and go on) fetches only the chunks that
  slice touches.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts


@dataclass
class Streamed:
    """A leaf to save whose values come in slices along its first `depth` axes (0: one piece, the whole)."""
    shape: tuple[int, ...]
    dtype: np.dtype
    depth: int
    slices: Callable[[], Iterator[tuple[tuple[int, ...], np.ndarray]]]


class LazyLeaf:
    """Restore type asking for an opened tensorstore instead of the array's values."""


class StreamedWriter(ocp.type_handlers.NumpyHandler):
    """Writes a `Streamed` leaf slice by slice, in the numpy handler's format."""

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        for value, info, arg in zip(values, infos, args):  # one leaf after another: one slice in memory
            await info.await_path_creation()
            chunk = (1,) * value.depth + tuple(value.shape[value.depth:])
            spec = ocp.type_handlers.get_json_tspec_write(
                info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=value.shape, local_shape=chunk,
                dtype=value.dtype, process_index=jax.process_index() if info.is_ocdbt_checkpoint else None, arg=arg)
            store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
            writing = None  # the previous slice compresses and writes while the next one is read
            for index, piece in value.slices():
                write = store[index].write(np.asarray(piece, dtype=value.dtype))
                if writing is not None:
                    await writing
                writing = write
            if writing is not None:
                await writing
        return []  # everything is written already: nothing left to commit in the background


class LazyReader(ocp.type_handlers.NumpyHandler):
    """Opens a saved array's tensorstore and hands it back unread."""

    async def deserialize(self, infos, args=None):
        opened = []
        for info in infos:
            await info.await_path_creation()
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=info.is_ocdbt_checkpoint)
            opened.append(ts.open(ts.Spec(spec), open=True, context=info.ts_context))
        return await asyncio.gather(*opened)


def _registry(leaf_type, handler):
    # The jax.Array handler is never used here, but Orbax warns when a registry lacks one.
    return ocp.type_handlers.create_type_handler_registry((leaf_type, handler),
                                                          (jax.Array, ocp.type_handlers.ArrayHandler()))


def save_streamed(path: Path, tree) -> None:
    """Save a tree whose leaves are all `Streamed` as an Orbax PyTree checkpoint at `path`."""
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=_registry(Streamed, StreamedWriter()))
                          ) as ckptr:
        ckptr.save(path, args=ocp.args.PyTreeSave(tree))


def open_lazy(path: Path):
    """The Orbax PyTree checkpoint at `path` with every array leaf an opened, unread tensorstore."""
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=_registry(LazyLeaf, LazyReader()))
                          ) as ckptr:
        tree = ckptr.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=LazyLeaf), tree)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def fetch(store, index: tuple[int, ...] = ()):
    """Start reading `store[index]` (only the chunks it touches); `.result()` gives the numpy array."""
    return store[index].read()


def read(store, index: tuple[int, ...] = ()) -> np.ndarray:
    """The values of `store[index]`."""
    return np.asarray(fetch(store, index).result())
