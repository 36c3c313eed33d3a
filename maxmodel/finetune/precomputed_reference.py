"""dpo.reference=precomputed: the reference's log-prob of every document, computed in one pass over the data
before the first step, then looked up on the host; the reference model is freed after the pass.

Worth it in full training, where the live reference (reference.py) is a second copy of the weights held for
the whole run and one more forward per step; with adapters the live reference costs no memory (it is the
frozen base inside the policy), so `live` stays the default: it needs no pass over data a short run may never
reach. A document is keyed by a hash of its tokens and loss mask: its sum does not depend on the row it was
packed into (segments do not see each other), so the training rows, shuffled and packed as they come, find
their documents' sums wherever they land. The table is saved as <run dir>/reference_logps.npz, so a resumed
run skips the pass (and never rebuilds the reference).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("maxmodel.train")
TABLE = "reference_logps.npz"


def document_keys(row: dict) -> list[tuple[int, int, int]]:
    """(segment, first position, key) of every document of one row: the key hashes its tokens and loss mask."""
    seg = row["segment_ids"]
    out = []
    for s in np.unique(seg[seg > 0]):
        where = np.flatnonzero(seg == s)
        h = hashlib.blake2b(digest_size=8)
        for k in ("inputs", "targets", "loss_mask"):
            h.update(np.ascontiguousarray(row[k][where]).tobytes())
        out.append((int(s), int(where[0]), int.from_bytes(h.digest(), "little", signed=True)))
    return out


class PrecomputedReference:
    """A Preparer: the step's global batch plus `ref_logps`, each document's reference sum at its first
    position (the losses sum a document's positions, so the sum counts once)."""

    def __init__(self, cfg, ts, mesh):
        from maxmodel.config.schema import run_dir_of
        self.cfg, self.ts, self.mesh = cfg, ts, mesh
        self.path = run_dir_of(cfg) / TABLE
        self.table: dict[int, float] | None = None

    def __call__(self, step, params, local):
        from maxmodel.train.step import global_batch
        if self.table is None:
            self.table = self._load() or self._compute(params)
        ref = np.zeros(local["inputs"].shape, np.float32)
        for b in range(ref.shape[0]):
            row = {k: v[b] for k, v in local.items()}
            for _, first, key in document_keys(row):
                if key not in self.table:
                    raise RuntimeError(f"a document of the {'held-out' if step is None else 'training'} data is "
                                       f"missing from {self.path}; delete it to recompute the reference")
                ref[b, first] = self.table[key]
        return global_batch({**local, "ref_logps": ref}, self.mesh)

    def _load(self):
        if not self.path.is_file():
            return None
        with np.load(self.path) as f:
            log.info("reference log-probs of %d documents from %s", len(f["keys"]), self.path)
            return dict(zip(f["keys"].tolist(), f["sums"].tolist()))

    def _compute(self, params) -> dict[int, float]:
        """One pass over the training rows (an epoch, unshuffled) and the held-out batches the loop evaluates."""
        from maxmodel.data.pipeline import make_train_data
        from maxmodel.train.step import global_batch

        from .reference import Reference
        cfg = self.cfg
        plain = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shuffle=False, workers=0, prefetch=0))
        info = jax.process_index(), jax.process_count()
        data = make_train_data(plain, self.path.parent, *info)
        rows = sum(v for k, v in data.stats.items() if k.endswith(".rows_per_epoch"))
        ref = Reference(cfg, self.ts, self.mesh)
        table: dict[int, float] = {}
        local_batches = [next(data.train) for _ in range(math.ceil(rows / cfg.train.batch_size))]
        for local in local_batches + list(data.eval_batches(cfg.run.eval_batches)):
            batch = global_batch(local, self.mesh)
            logps = multihost_utils.process_allgather(ref(params, batch), tiled=True)
            rows_all = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in batch.items()}
            for b in range(logps.shape[0]):
                row = {k: np.asarray(v[b]) for k, v in rows_all.items()}
                for s, _, key in document_keys(row):
                    table[key] = float(np.sum(logps[b][row["segment_ids"] == s], dtype=np.float32))
        del ref  # the frozen copy of full training goes now: the steps never need it
        if jax.process_index() == 0:
            keys = np.fromiter(table, np.int64, len(table))
            np.savez(self.path, keys=keys, sums=np.fromiter(table.values(), np.float32, len(table)))
        log.info("reference log-probs of %d documents computed and saved to %s", len(table), self.path)
        return table
