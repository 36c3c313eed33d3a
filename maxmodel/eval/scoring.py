"""Log-likelihoods of many token sequences per forward pass: sequences packed into rows with per-document
segment ids and positions (the Levanter pattern), so one row of `row_len` tokens scores as many requests as
fit, and no request sees another (attention is masked to equal segment ids, positions restart per
sequence: a packed sequence scores exactly as it would alone).

A sequence is `(tokens, start)`: the log-probability of tokens[start:] given everything before (start >= 1).
Its `len(tokens) - 1` predictions go into one row; rows are filled first-fit (data/packing.py's planner,
the one training uses), longest sequences first. Batches have a fixed shape [rows, row_len] (row_len the
smallest of a few bucket lengths that holds the batch's longest sequence), so a whole evaluation compiles
a handful of programs. Only the scored positions reach the vocabulary head (gathered into [rows, K], K a
power of two): for a multiple-choice request that is its few continuation tokens, not its context. Rows go over the batch axes of the mesh (data, fsdp, expert) as in training.

Multi-host: process 0 drives (lm-eval runs there); the other processes call `follow()`, which receives each
batch by broadcast and joins the same global forward pass, until process 0's `close()`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from maxmodel.data.packing import first_fit
from maxmodel.data.windows import positions_from_segments

_SCORE, _STOP = 1, 0


@dataclasses.dataclass
class Score:
    logprob: float        # sum of log p(token) over the scored tokens
    is_greedy: bool       # every scored token is the argmax of its prediction
    tokens: int           # how many tokens were scored


def _buckets(max_len: int, smallest: int = 128) -> tuple[int, ...]:
    """Row lengths: powers of two from `smallest` up to (and including) max_len."""
    out, b = [], min(smallest, max_len)
    while b < max_len:
        out.append(b)
        b *= 2
    return (*out, max_len)


class PackedScorer:
    """Scores sequences with the model `graphdef` + `params` on `mesh` under `rules` (the engine's or the
    trainer's). `max_len`: the longest sequence (tokens) scored; `rows`: rows per forward pass (rounded up
    to whole rows per batch shard); `row_len`: the shortest row length used (longer batches use the
    buckets above it)."""

    def __init__(self, cfg, graphdef, params, mesh, rules, max_len: int = 0, rows: int = 16, row_len: int = 256):
        self.cfg, self.graphdef, self.params, self.mesh, self.rules = cfg, graphdef, params, mesh, rules
        self.max_len = min(max_len or cfg.model.max_seq_len, cfg.model.max_seq_len)
        shards = math.prod(mesh.shape[a] for a in ("data", "fsdp", "expert") if a in mesh.shape)
        self.rows = -(-rows // shards) * shards
        self.buckets = _buckets(self.max_len, min(row_len, self.max_len))
        self.forward_passes = 0
        with self.context():
            from maxmodel.train.step import batch_sharding
            self.row_sharding = batch_sharding(mesh)
        self._fn = jax.jit(self._score_fn, out_shardings=NamedSharding(mesh, PartitionSpec()))

    @contextlib.contextmanager
    def context(self):
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            yield

    def set_params(self, params) -> None:
        """New weights of the same tree (the trainer's current step): nothing recompiles."""
        self.params = params

    def _score_fn(self, params, inputs, segment_ids, positions, index, targets):
        """At the scored positions `index` [B, K] only: log p(target) and whether the target is the argmax
        (f32 log-softmax, as lm-eval's hf backend takes it). The vocabulary head runs on those K positions,
        not all L: a multiple-choice request scores a few continuation tokens after a long context."""
        model = nnx.merge(self.graphdef, params)
        hidden, _ = model.hidden(inputs, segment_ids, positions)
        hidden = jnp.take_along_axis(hidden, index[..., None], axis=1)
        logits = model.logits(hidden).astype(jnp.float32)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return target_logit - log_z, jnp.argmax(logits, axis=-1) == targets

    # ---- host side

    def score(self, sequences: list[tuple[list[int], int]]) -> list[Score]:
        """Score of each (tokens, start), in order."""
        for tokens, start in sequences:
            if not 1 <= start < len(tokens):
                raise ValueError(f"a sequence of {len(tokens)} tokens cannot be scored from token {start}")
            if len(tokens) - 1 > self.max_len:
                raise ValueError(f"a sequence of {len(tokens)} tokens makes more than max_len={self.max_len} "
                                 f"predictions; truncate it first")
        out: list[Score | None] = [None] * len(sequences)
        remaining = np.array(sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0])), np.int64)
        while len(remaining):  # one batch: what first-fit places in the first `rows` rows, longest first
            row_len = next(b for b in self.buckets if b >= len(sequences[remaining[0]][0]) - 1)
            sizes = np.array([len(sequences[i][0]) - 1 for i in remaining], np.int64)
            # what cannot fit is not planned (twice the capacity leaves room for small ones filling gaps)
            head = int(np.searchsorted(np.cumsum(sizes), 2 * self.rows * row_len, side="right")) + 1
            placed = first_fit(sizes[:head], row_len, open_rows=self.rows)
            here = np.zeros(len(remaining), bool)
            here[:head] = placed < self.rows
            batch = remaining[here].tolist()
            self._run_batch([sequences[i] for i in batch], placed[placed < self.rows], row_len, out, batch)
            remaining = remaining[~here]
        return out  # type: ignore[return-value]

    def _run_batch(self, seqs, rows_of, row_len: int, out: list, ids: list[int]) -> None:
        arrays = {k: np.zeros((self.rows, row_len), np.int32) for k in ("inputs", "segment_ids")}
        fill, scored = np.zeros(self.rows, np.int64), [[] for _ in range(self.rows)]
        targets = [[] for _ in range(self.rows)]
        spans = []
        for (tokens, start), r in zip(seqs, rows_of):
            n, a = len(tokens) - 1, int(fill[r])
            arrays["inputs"][r, a:a + n] = tokens[:-1]
            arrays["segment_ids"][r, a:a + n] = int(arrays["segment_ids"][r].max()) + 1
            k = len(scored[r])
            scored[r] += range(a + start - 1, a + n)  # the positions predicting tokens[start:]
            targets[r] += tokens[start:]
            spans.append((r, k, len(scored[r])))
            fill[r] += n
        width = next(b for b in _buckets(row_len, 16) if b >= max(map(len, scored)))
        arrays["index"], arrays["targets"] = (np.zeros((self.rows, width), np.int32) for _ in range(2))
        for r in range(self.rows):
            arrays["index"][r, :len(scored[r])] = scored[r]
            arrays["targets"][r, :len(targets[r])] = targets[r]
        logp, greedy = self._forward(arrays)
        for i, (r, a, b) in zip(ids, spans):
            out[i] = Score(float(logp[r, a:b].astype(np.float64).sum()), bool(greedy[r, a:b].all()), b - a)

    def _forward(self, arrays: dict) -> tuple[np.ndarray, np.ndarray]:
        if jax.process_count() > 1:  # the followers join this batch
            _broadcast(np.array([_SCORE, arrays["inputs"].shape[1], arrays["index"].shape[1]], np.int32))
            arrays = _broadcast(arrays)
        return self._global_forward(arrays)

    def _global_forward(self, arrays: dict) -> tuple[np.ndarray, np.ndarray]:
        arrays = dict(arrays, positions=np.stack([positions_from_segments(s) for s in arrays["segment_ids"]]))
        with self.context():
            batch = [jax.make_array_from_callback(arrays[k].shape, self.row_sharding, lambda i, k=k: arrays[k][i])
                     for k in ("inputs", "segment_ids", "positions", "index", "targets")]
            logp, greedy = self._fn(self.params, *batch)
        self.forward_passes += 1
        # replicated: every process holds the whole result (np.asarray refuses arrays spanning processes)
        return np.asarray(logp.addressable_data(0)), np.asarray(greedy.addressable_data(0))

    def follow(self) -> None:
        """On processes other than 0: join process 0's forward passes until it calls `close()`."""
        while True:
            cmd, row_len, width = (int(x) for x in _broadcast(np.zeros(3, np.int32)))
            if cmd == _STOP:
                return
            shapes = {"inputs": row_len, "segment_ids": row_len, "index": width, "targets": width}
            self._global_forward(_broadcast({k: np.zeros((self.rows, n), np.int32) for k, n in shapes.items()}))

    def close(self) -> None:
        """On process 0: release the followers."""
        if jax.process_count() > 1:
            _broadcast(np.array([_STOP, 0, 0], np.int32))


def _broadcast(tree):
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))
