"""Static pipeline schedules with separate forward and backward steps: 1F1B, interleaved 1F1B, zero bubble.

A schedule is a table: at tick t, device d does one step, the forward F(m, v) or the backward B(m, v) of
microbatch m through virtual stage v (layers chunk v = r·S + d, R chunks per device: R = 1 is 1F1B, R > 1
interleaved). It is made here, in Python, once per (S, M, R), by list scheduling:

- F(m, v) is ready when F(m, v-1) ran at an earlier tick; B(m, v) when F(m, v) and B(m, v+1) did (the last
  virtual stage's backward starts from the loss).
- Each device runs its forwards in Megatron's order (groups of S microbatches, chunk by chunk) and its
  backwards in reverse chunk order, the next of each when it is ready; a forward only while fewer than its
  cap of microbatches are in flight (forwarded, not yet backwarded) on it. The cap is Megatron's warmup + 1:
  S - d for 1F1B, (S - d - 1)·2 + (R - 1)·S + 1 interleaved. After a backward the device tries a forward
  first, after a forward a backward (Megatron's steady-state alternation): this reaches the ideal
  2·M·R + 2(S - 1) ticks, where always preferring backwards stalls the interleaved pipeline.

So at most `cap` (≤ S for 1F1B on any device) stage inputs are kept at once, whatever M: the activation
memory of 1F1B. The executor (pipeline_1f1b.py) keeps each forward's input in a stash slot until its backward
recomputes the stage under jax.vjp, and messages between neighbours (activations forward, cotangents
backward) in mailbox slots until they are read; slots are assigned here so that none is overwritten early.

Zero bubble (ZB-H1, `split_backward`): B(m, v) makes only the input's cotangent, and W(m, v), after it, the
parameters' gradients; a device runs a pending W when no F or B of its own is ready, so weight steps fill the
bubbles of the warm-up and cool-down. A microbatch counts as in flight until its W (its input stays stashed
for W's recompute, and B's cotangent waits in a `ct` slot), so the caps above bound memory unchanged. In
ticks of one step, (S, M) = (4, 8) takes 30 where the ideal is 3M + S - 1 = 27 and 1F1B, whose backward is
both halves, 22 ticks = 33 step-units. With B and W each recomputing the stage, a microbatch costs 5
forward-equivalents against 1F1B's 4: on hardware where a tick lasts as long as the slowest device's step
(lockstep SPMD), zero bubble's ticks are shorter and more even; where devices share one CPU, it is more work.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IDLE, FORWARD, BACKWARD, WEIGHT = 0, 1, 2, 3


@dataclass(frozen=True)
class Schedule:
    """[T, S] int32 tables, one row per tick and column per device. op: IDLE / FORWARD / BACKWARD; mb, rep:
    the microbatch and the device's chunk; src: a forward's input mailbox slot (-1: the pipeline's input) or
    a backward's cotangent slot (-1: from the loss); stash: where a forward keeps its input / a backward reads
    it; recv_f, recv_b: the slot a message arriving at the end of the tick goes to (-1: none arrives)."""
    stages: int
    microbatches: int
    repeats: int
    op: np.ndarray
    mb: np.ndarray
    rep: np.ndarray
    src: np.ndarray
    stash: np.ndarray
    recv_f: np.ndarray
    recv_b: np.ndarray
    stash_slots: int
    mail_f_slots: int
    mail_b_slots: int
    ct: np.ndarray | None = None
    ct_slots: int = 1

    @property
    def split_backward(self) -> bool:
        return self.ct is not None

    @property
    def ticks(self) -> int:
        return self.op.shape[0]

    @property
    def bubble(self) -> float:
        """Idle share of device-ticks (a backward counted as one tick, like a forward)."""
        return float((self.op == IDLE).mean())


def in_flight_cap(stages: int, repeats: int, device: int) -> int:
    """Microbatches a device may hold (forwarded, and not yet backwarded: weight-gradient step included)."""
    if repeats == 1:
        return stages - device
    return (stages - device - 1) * 2 + (repeats - 1) * stages + 1


def _slots(intervals: list[tuple[int, int, tuple]]) -> tuple[dict, int]:
    """Smallest free slot for each [start, end] interval (end inclusive); -> ({key: slot}, slots used)."""
    free_at: list[int] = []  # slot -> first tick it is free again
    out = {}
    for start, end, key in sorted(intervals):
        slot = next((i for i, f in enumerate(free_at) if f <= start), len(free_at))
        if slot == len(free_at):
            free_at.append(0)
        free_at[slot] = end + 1
        out[key] = slot
    return out, max(1, len(free_at))


def make_schedule(stages: int, microbatches: int, repeats: int = 1, split_backward: bool = False) -> Schedule:
    """The table for (S, M, R). `split_backward`: zero bubble (ZB-H1, Qi et al. 2023): each backward is
    split into BACKWARD (the input's cotangent, which the previous device waits for) and WEIGHT (the
    parameters' gradients, which nobody waits for), and a device runs a pending WEIGHT whenever it has no
    forward or backward to run: the weight steps fill the warm-up and cool-down bubbles. A microbatch stays
    in flight until its WEIGHT, so the 1F1B caps bound memory as before."""
    S, M, R = stages, microbatches, repeats
    if min(S, M, R) < 1:
        raise ValueError(f"stages={S}, microbatches={M} and repeats={R} must all be >= 1")
    if R > 1 and M % S:
        raise ValueError(f"interleaved 1F1B needs microbatches ({M}) divisible by stages ({S})")
    V = S * R
    f_order = [sorted(((m // S, r, m) for r in range(R) for m in range(M))) for _ in range(S)]
    b_order = [sorted(((m // S, -r, m) for r in range(R) for m in range(M))) for _ in range(S)]
    f_done: dict[tuple[int, int], int] = {}
    b_done: dict[tuple[int, int], int] = {}
    w_done: dict[tuple[int, int], int] = {}
    pending_w: list[list[tuple[int, int]]] = [[] for _ in range(S)]
    caps = [in_flight_cap(S, R, d) for d in range(S)]
    flying = [0] * S
    last = [FORWARD] * S
    rows = []
    t = 0
    while len(b_done) < M * V or len(w_done) < (M * V if split_backward else 0):
        row = []
        for d in range(S):
            step = None  # each device runs its forwards, its backwards and its weight steps in order

            def backward():
                if not b_order[d]:
                    return None
                _, neg_r, m = b_order[d][0]
                v = -neg_r * S + d
                if f_done.get((m, v), t) < t and (v == V - 1 or b_done.get((m, v + 1), t) < t):
                    b_order[d].pop(0)
                    return BACKWARD, m, -neg_r
                return None

            def forward():
                if not f_order[d] or flying[d] >= caps[d]:
                    return None
                _, r, m = f_order[d][0]
                v = r * S + d
                if v == 0 or f_done.get((m, v - 1), t) < t:
                    f_order[d].pop(0)
                    return FORWARD, m, r
                return None

            def weight():  # (a backward joins pending_w after its tick: always ready at a later one)
                if not pending_w[d]:
                    return None
                m, r = pending_w[d].pop(0)
                return WEIGHT, m, r
            first, second = (forward, backward) if last[d] == BACKWARD else (backward, forward)
            step = first() or second() or (weight() if split_backward else None)
            if step is not None and step[0] != WEIGHT:
                last[d] = step[0]
            row.append(step)
        for d, step in enumerate(row):
            if step is None:
                continue
            kind, m, r = step
            v = r * S + d
            if kind == FORWARD:
                f_done[(m, v)] = t
                flying[d] += 1
            elif kind == BACKWARD:
                b_done[(m, v)] = t
                if split_backward:
                    pending_w[d].append((m, r))
                else:
                    flying[d] -= 1
            else:
                w_done[(m, v)] = t
                flying[d] -= 1
        if all(step is None for step in row):
            raise RuntimeError(f"pipeline schedule stalled at tick {t} (S={S}, M={M}, R={R})")
        rows.append(row)
        t += 1
    return _tables(S, M, R, rows, f_done, b_done, w_done if split_backward else None)


def _tables(S, M, R, rows, f_done, b_done, w_done=None) -> Schedule:
    T, V = len(rows), S * R
    # stash: F(m, v)'s input from its tick to B(m, v)'s (W(m, v)'s when split), on v's device; a split
    # backward's cotangent from B(m, v) to W(m, v)
    freed = w_done if w_done is not None else b_done
    stash, n_stash, cts, n_ct = {}, 1, {}, 1
    for d in range(S):
        got, n = _slots([(f_done[(m, v)], freed[(m, v)], (m, v)) for (m, v) in f_done if v % S == d])
        stash |= got
        n_stash = max(n_stash, n)
        if w_done is not None:
            got, n = _slots([(b_done[(m, v)], w_done[(m, v)], (m, v)) for (m, v) in b_done if v % S == d])
            cts |= got
            n_ct = max(n_ct, n)
    # forward messages: F(m, v) -> F(m, v+1) on the next device; backward: B(m, v) -> B(m, v-1)
    mail_f, n_f, mail_b, n_b = {}, 1, {}, 1
    for d in range(S):
        got, n = _slots([(f_done[(m, v - 1)] + 1, f_done[(m, v)], (m, v)) for (m, v) in f_done
                         if v % S == d and v > 0])
        mail_f |= got
        n_f = max(n_f, n)
        got, n = _slots([(b_done[(m, v + 1)] + 1, b_done[(m, v)], (m, v)) for (m, v) in b_done
                         if v % S == d and v < V - 1])
        mail_b |= got
        n_b = max(n_b, n)
    tab = {k: np.full((T, S), -1, np.int32) for k in ("src", "stash", "recv_f", "recv_b", "ct")}
    op, mb, rep = (np.zeros((T, S), np.int32) for _ in range(3))
    for t, row in enumerate(rows):
        for d, step in enumerate(row):
            if step is None:
                continue
            kind, m, r = step
            v = r * S + d
            op[t, d], mb[t, d], rep[t, d] = kind, m, r
            tab["stash"][t, d] = stash[(m, v)]
            if kind != FORWARD and w_done is not None:
                tab["ct"][t, d] = cts[(m, v)]
            if kind == WEIGHT:
                continue
            if kind == FORWARD:
                if v > 0:
                    tab["src"][t, d] = mail_f[(m, v)]
                if v < V - 1:  # its output lands on the next device at the end of this tick
                    tab["recv_f"][t, (d + 1) % S] = mail_f[(m, v + 1)]
            else:
                if v < V - 1:
                    tab["src"][t, d] = mail_b[(m, v)]
                if v > 0:
                    tab["recv_b"][t, (d - 1) % S] = mail_b[(m, v - 1)]
    return Schedule(S, M, R, op, mb, rep, tab["src"], tab["stash"], tab["recv_f"], tab["recv_b"], n_stash, n_f, n_b,
                    tab["ct"] if w_done is not None else None, n_ct)
