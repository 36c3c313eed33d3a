"""Prefix caching: the KV blocks of prompts already seen, so a request prefills only what is new.

A prompt is cut into fixed-size blocks of `block_size` tokens; block i is keyed by a hash chain
key_i = H(key_{i-1}, tokens of block i), so a key names the whole prefix up to the block's end and two
prompts share exactly the blocks of their common full-block prefix. A block holds, for every layer, the
keys/values (and int8 scales) of its positions, copied to host memory (numpy) out of a prefilled row.

A request looks up its chain, keeps the longest run of cached blocks (full blocks only, and at least one
prompt token is left to prefill: its logits start the sampling), writes those blocks into a fresh row and
lets `Engine.prefill(prompt, row, start=cached)` do the rest; the row's new full blocks are then stored.
Finished sequences can be stored too (`store_slot`, the batcher's finish hook): a chat's second turn then
reuses the first turn's prompt AND answer.

Tiers: host memory, LRU by bytes (`capacity_bytes`); blocks evicted from it spill to `disk_dir` (LRU by
`disk_bytes`) when one is given and come back into memory on a hit. Blocks depend on the weights, so
`Engine.set_params` drops everything (memory and the files this cache wrote).

Sliding-window layers keep a ring of window+spare slots, so a row only holds the last positions of those
layers: a block records from which position on (`ring_from`) its ring layers' part was still in the ring
when it was read, and a prefix of length L is reused only if every position the next token can see,
[L - window + 1, L), is covered. Slots outside the window are never attended, so what they hold (zeros, or
a newer position's keys read from a reused slot) does not change a single logit. Only a row's last
`window` positions are trusted when its blocks are stored: a row built from blocks is right from
(reuse point - window + 1) on, never earlier.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import os
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .engine import Engine, _batch_axis, constrain_cache

log = logging.getLogger("maxmodel.inference")

_SUFFIX = ".kvblock.npz"
# Compiled read/write per (engine, block size): caches made later (tests, a restarted server) reuse them.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def block_keys(tokens, block_size: int) -> list[bytes]:
    """The hash chain of the full blocks of `tokens`."""
    keys, key = [], b""
    for i in range(len(tokens) // block_size):
        block = np.asarray(tokens[i * block_size:(i + 1) * block_size], np.int64).tobytes()
        key = hashlib.blake2b(key + block, digest_size=16).digest()
        keys.append(key)
    return keys


class PrefixCache:
    """A drop-in for `Engine.prefill` (same signature) that reuses cached prefix blocks."""

    def __init__(self, engine: Engine, block_size: int = 16, capacity_bytes: int = 1 << 30,
                 disk_dir: str | os.PathLike | None = None, disk_bytes: int = 0):
        self.engine, self.block_size = engine, block_size
        self.capacity_bytes, self.disk_bytes = capacity_bytes, disk_bytes
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.memory: collections.OrderedDict[bytes, dict] = collections.OrderedDict()  # key -> entry, LRU first
        self.disk: collections.OrderedDict[bytes, int] = collections.OrderedDict()     # key -> file bytes
        self.counters = collections.Counter()
        row = engine.new_row()
        self._groups = list(row)
        # Per leaf (group, sub-layer, name), flattened in this order everywhere: its slot axis and whether it is
        # a ring (fewer slots than max_len: a sliding-window layer), with the window it serves.
        windows = dict(engine._model(engine.run_params).cache_groups())
        self._leaves = []
        for g in self._groups:
            for j, c in enumerate(row[g]):
                for name in sorted(c):
                    ax = _batch_axis(g) + 2
                    slots = c[name].shape[ax]
                    self._leaves.append((g, j, name, ax, slots, windows[g][j] if slots < engine.max_len else 0))
        self._zeros = [np.zeros(self._block_shape(row, leaf), row[leaf[0]][leaf[1]][leaf[2]].dtype)
                       for leaf in self._leaves]
        self.window = max((w for *_, w in self._leaves), default=0)
        self._min_window = min((w for *_, w in self._leaves if w), default=engine.max_len)
        ring_slots = min((s for *_, s, w in self._leaves if w), default=engine.max_len)
        self.enabled = ring_slots >= block_size
        if not self.enabled:
            log.warning("prefix cache disabled: a sliding-window layer keeps %d slots, fewer than a block of %d",
                        ring_slots, block_size)
        fns = _COMPILED.setdefault(engine, {})
        if block_size not in fns:
            fns[block_size] = (jax.jit(self._read_fn), jax.jit(self._write_fn, donate_argnums=0))
        self._read, self._write = fns[block_size]
        engine.on_params_changed.append(self.clear)
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            for f in self.disk_dir.glob(f"*{_SUFFIX}"):  # written under weights we cannot know: never reuse
                f.unlink()

    def _block_shape(self, row, leaf):
        g, j, name, ax, _, _ = leaf
        shape = list(row[g][j][name].shape)
        shape[ax] = self.block_size
        return tuple(shape)

    # ---- compiled: one shape each (the block start is traced); positions map to slots p % S, as the model's

    def _read_fn(self, cache, batch_index, start):
        """Positions [start, start + block) of row `batch_index` of `cache` (a row, or the decode state's)."""
        self.engine.traces["prefix_read", cache[self._groups[0]][0]["k"].shape[_batch_axis(self._groups[0])]] += 1
        out = []
        for g, j, name, ax, slots, _ in self._leaves:
            x = jax.lax.dynamic_slice_in_dim(cache[g][j][name], batch_index, 1, _batch_axis(g))
            out.append(jnp.take(x, (start + jnp.arange(self.block_size)) % slots, axis=ax))
        return out

    def _write_fn(self, row, leaves, start):
        self.engine.traces["prefix_write"] += 1
        row = {g: [dict(c) for c in caches] for g, caches in row.items()}
        for (g, j, name, ax, slots, _), x in zip(self._leaves, leaves):
            idx = (slice(None),) * ax + ((start + jnp.arange(self.block_size)) % slots,)
            row[g][j][name] = row[g][j][name].at[idx].set(x)
        return constrain_cache(row)

    # ---- the prefill

    def __call__(self, prompt_ids, row=None, start: int = 0, echo: bool = False):
        if echo or row is not None or start or not self.enabled:  # echo scores every prompt position itself
            return self.engine.prefill(prompt_ids, row, start, echo)
        prompt_ids = [int(t) for t in prompt_ids]
        keys = block_keys(prompt_ids[:len(prompt_ids) - 1], self.block_size)  # leave >= 1 token to prefill
        blocks = self._lookup(keys, prompt_ids)
        cached = len(blocks) * self.block_size
        self.counters["lookups"] += 1
        row = self.engine.new_row()
        if blocks:
            self.counters["hits"] += 1
            self.counters["prefill_tokens_saved"] += cached
            with self.engine.context():
                for i, entry in enumerate(blocks):
                    leaves = [z if x is None else x for x, z in zip(entry["leaves"], self._zeros)]
                    row = self._write(row, leaves, jnp.int32(i * self.block_size))
        row, logits, scores = self.engine.prefill(prompt_ids, row, start=cached)
        self._store(row, 0, prompt_ids, len(prompt_ids))
        return row, logits, scores

    def store_slot(self, slot: int, token_ids) -> None:
        """Keep the blocks of the sequence in decode slot `slot` (its KV holds the first lengths[slot] of
        `token_ids`: prompt + generated, all but the last sampled token)."""
        if self.enabled:
            n = int(self.engine.state.lengths[slot])
            self._store(self.engine.state.cache, slot, [int(t) for t in token_ids[:n]], n)

    def _store(self, cache, batch_index: int, tokens, length: int) -> None:
        bs = self.block_size
        for i, key in enumerate(block_keys(tokens, bs)):
            # Trust the ring layers only for the last `window` positions: the ring holds length - slots on, but
            # a row built from cached blocks is only right from (reuse point - window + 1) on, which is at most
            # length - window (older slots hold zeros or, in a reused slot, newer positions).
            ring_from = max(i * bs, length - self._min_window)
            old = self.memory.get(key)
            if key in self.disk or (old is not None and old["ring_from"] <= ring_from):
                if old is not None:
                    self.memory.move_to_end(key)
                continue
            if old is not None:  # this row's ring layers cover more of the block: replace the entry
                self.counters["bytes"] -= self._nbytes(self.memory.pop(key))
            with self.engine.context():
                leaves = self._read(cache, jnp.int32(batch_index), jnp.int32(i * bs))
            in_ring = ring_from < (i + 1) * bs
            leaves = [None if w and not in_ring else np.asarray(x) for x, (*_, w) in zip(leaves, self._leaves)]
            self._put(key, {"tokens": np.asarray(tokens[i * bs:(i + 1) * bs], np.int32), "leaves": leaves,
                            "ring_from": ring_from if in_ring else (i + 1) * bs})
            self.counters["blocks_stored"] += 1

    # ---- tiers

    def _lookup(self, keys, tokens) -> list[dict]:
        """The longest usable run of cached blocks at the start of the chain."""
        found = []
        for i, key in enumerate(keys):
            entry = self._get(key)
            block = tokens[i * self.block_size:(i + 1) * self.block_size]
            if entry is None or not np.array_equal(entry["tokens"], block):  # a miss (or a hash collision)
                break
            found.append(entry)
        if self.window:  # shorten until the ring layers hold all the next token sees: [L - window + 1, L)
            def complete(k):
                need = max(0, k * self.block_size - self.window + 1)
                return all(e["ring_from"] <= max(need, i * self.block_size)
                           for i, e in enumerate(found[:k]) if (i + 1) * self.block_size > need)
            while found and not complete(len(found)):
                found.pop()
        return found

    @staticmethod
    def _nbytes(entry) -> int:
        return sum(x.nbytes for x in entry["leaves"] if x is not None)

    def _get(self, key):
        if key in self.memory:
            self.memory.move_to_end(key)
            return self.memory[key]
        if key in self.disk:
            path = self._path(key)
            with np.load(path) as f:
                present = f["present"]
                entry = {"tokens": f["tokens"], "ring_from": int(f["ring_from"]),
                         "leaves": [f[f"leaf{i}"] if p else None for i, p in enumerate(present)]}
            del self.disk[key]
            path.unlink()
            self.counters["disk_hits"] += 1
            self._put(key, entry)
            return entry
        return None

    def _put(self, key, entry) -> None:
        self.memory[key] = entry
        self.counters["bytes"] += self._nbytes(entry)
        while self.counters["bytes"] > self.capacity_bytes and self.memory:
            old_key, old = self.memory.popitem(last=False)
            self.counters["bytes"] -= self._nbytes(old)
            self.counters["evictions"] += 1
            if self.disk_dir is not None and old_key != key:
                self._spill(old_key, old)

    def _path(self, key: bytes) -> Path:
        return self.disk_dir / f"{key.hex()}{_SUFFIX}"

    def _spill(self, key, entry) -> None:
        if self._nbytes(entry) > self.disk_bytes:
            return
        arrays = {f"leaf{i}": x for i, x in enumerate(entry["leaves"]) if x is not None}
        present = np.array([x is not None for x in entry["leaves"]])
        np.savez(self._path(key), tokens=entry["tokens"], present=present, ring_from=entry["ring_from"], **arrays)
        self.disk[key] = self._path(key).stat().st_size
        self.counters["disk_bytes"] += self.disk[key]
        while self.counters["disk_bytes"] > self.disk_bytes:
            old_key, size = self.disk.popitem(last=False)
            self.counters["disk_bytes"] -= size
            self._path(old_key).unlink(missing_ok=True)

    def clear(self) -> None:
        """Drop every block (the weights changed: the cached keys/values are stale)."""
        self.memory.clear()
        for key in self.disk:
            self._path(key).unlink(missing_ok=True)
        self.disk.clear()
        self.counters["bytes"] = self.counters["disk_bytes"] = 0
        self.counters["invalidations"] += 1

    def stats(self) -> dict:
        return {f"prefix_{k}": v for k, v in self.counters.items()} | {"prefix_blocks": len(self.memory)}
