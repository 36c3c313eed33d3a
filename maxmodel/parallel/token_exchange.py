"""The token exchange of dropless expert parallelism (`model.moe.exchange`), inside the experts' shard_map.

Each device holds N = tokens·k token copies sorted by expert; the experts live on n devices (`expert` mesh
axis), E/n on each. The copies for device j's experts are one contiguous run of the sorted rows; the
receiver sorts what it got by its local expert, runs the grouped matmul, and sends the results back.

* `padded`: one `all_to_all` of an [n, N, D] buffer, N rows per destination: room for the worst case, in
  which every copy goes to one device. Each device sends (n-1)·N rows to the others whatever the routing.
* `ragged`: `jax.lax.ragged_all_to_all` sends each destination only its rows (offsets and sizes computed
  here); the receive buffer keeps the worst-case size [n·N, D], but the bytes on the wire are the copies
  routed to other devices: about (n-1)/n·N with balanced routing, n times fewer than `padded`. XLA:TPU and
  XLA:GPU have the collective; XLA:CPU does not ("HLO opcode ragged-all-to-all is not supported"), so there
  the same call runs `emulated_ragged_all_to_all`, the collective's documented semantics built from
  `all_gather` (same values, more bytes): a job meant for a TPU pod runs unchanged on a CPU laptop.
* `auto`: ragged on TPU and GPU, padded on CPU.

Both exchanges return the token copies' expert outputs in their sorted order, and the number of rows this
device sent to other devices (the return trip sends as many back): the `sent_rows` MoE stat.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from maxmodel.config.errors import ConfigError

from .mesh import platform

EXCHANGES = ("auto", "padded", "ragged")
KEY = "model.moe.exchange"


def choose(exchange: str, on: str | None = None) -> str:
    """The exchange to run for `exchange` on platform `on` (default: the one being compiled for)."""
    if exchange not in EXCHANGES:
        raise ConfigError(KEY, f"{exchange!r} is not one of {', '.join(EXCHANGES)}")
    if exchange == "auto":
        return "ragged" if (on or platform()) in ("tpu", "gpu", "cuda", "rocm") else "padded"
    return exchange


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """`jax.lax.ragged_all_to_all`'s result from `all_gather`s, for backends without the collective.

    Slice i of every caller's (input_offsets, send_sizes) goes to device i // (K / n), where it is written at
    that caller's output_offsets[i]; rows of `output` no slice covers keep their values. recv_sizes is not
    needed to place anything (the senders' sizes say it all); it is accepted for the same signature."""
    del recv_sizes
    n = jax.lax.axis_size(axis_name)
    me = jax.lax.axis_index(axis_name)
    per_device = input_offsets.shape[0] // n
    rows = jnp.arange(output.shape[0])
    every = jax.lax.all_gather(operand, axis_name)                                  # [n, N, ...]

    def mine(a):  # [n sources, slices for me]
        return jax.lax.dynamic_slice_in_dim(jax.lax.all_gather(a, axis_name), me * per_device, per_device, 1)
    start, size, src_off = mine(output_offsets), mine(send_sizes), mine(input_offsets)
    covers = (rows >= start[..., None]) & (rows < (start + size)[..., None])       # [n, slices, M]
    source = jnp.broadcast_to(jnp.arange(n)[:, None, None], covers.shape)
    at = src_off[..., None] + rows - start[..., None]
    hit = jnp.any(covers, axis=(0, 1))
    which = jnp.argmax(covers.reshape(-1, rows.shape[0]), axis=0)                   # the covering slice
    src = source.reshape(-1, rows.shape[0])[which, rows]
    pos = jnp.clip(at.reshape(-1, rows.shape[0])[which, rows], 0, operand.shape[0] - 1)
    got = every[src, pos]
    return jnp.where(hit.reshape(-1, *([1] * (output.ndim - 1))), got, output)


def _ragged_all_to_all(*args, axis_name):
    if platform() == "cpu":
        return emulated_ragged_all_to_all(*args, axis_name=axis_name)
    return jax.lax.ragged_all_to_all(*args, axis_name=axis_name)


def _local_groups(block_starts, block_sizes, per_expert, rows):
    """For received rows laid out as one block per source (block_starts / block_sizes [n]), each block sorted
    by local expert with per_expert [n, E/n] rows: each row's local expert, E/n for rows in no block."""
    r = jnp.arange(rows)
    n, e_local = per_expert.shape
    src = jnp.sum(r[:, None] >= (block_starts + block_sizes)[None, :], axis=1)      # n: past the last block
    src_c = jnp.minimum(src, n - 1)
    offset = r - block_starts[src_c]
    local = jnp.sum(offset[:, None] >= jnp.cumsum(per_expert, axis=1)[src_c], axis=1)
    inside = (src < n) & (offset >= 0)
    return jnp.where(inside, local, e_local)


def _sent_to_others(dest_total, axis):
    return jnp.sum(dest_total) - dest_total[jax.lax.axis_index(axis)]


def padded_exchange(ffn, xs, counts, n, axis):
    """Expert outputs for copies `xs` [N, D] sorted by expert (counts [E]), via [n, N, D] all_to_alls.
    `ffn(rows, group_sizes)` runs the local experts."""
    rows, d = xs.shape
    per_dest = counts.reshape(n, -1)
    dest_total = jnp.sum(per_dest, axis=1)
    starts = jnp.cumsum(dest_total) - dest_total
    j = jnp.arange(rows)
    valid = j[None, :] < dest_total[:, None]                                      # [n, rows]
    send = jnp.where(valid[..., None], xs[jnp.clip(starts[:, None] + j[None, :], 0, rows - 1)], 0)
    recv = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)                        # [n sources, rows, D]
    recv_counts = jax.lax.all_to_all(per_dest, axis, 0, 0, tiled=True)             # [n sources, E/n]
    local_id = _local_groups(jnp.arange(n) * rows, jnp.sum(recv_counts, axis=1), recv_counts, n * rows)
    order = jnp.argsort(local_id, stable=True)
    out = ffn(recv.reshape(n * rows, d)[order], jnp.sum(recv_counts, axis=0))
    back = jnp.zeros_like(out).at[order].set(out).reshape(n, rows, d)
    back = jax.lax.all_to_all(back, axis, 0, 0, tiled=True)                        # [n destinations, rows, D]
    dest = jnp.sum(j[:, None] >= jnp.cumsum(dest_total)[None, :], axis=1)          # each sorted copy's device
    dest = jnp.minimum(dest, n - 1)
    # (n-1)·N rows cross the wire, whatever the routing
    return back[dest, j - starts[dest]], jnp.asarray((n - 1) * rows, jnp.int32)


def ragged_exchange(ffn, xs, counts, n, axis):
    """As padded_exchange, with ragged_all_to_all sending each device only the rows for its experts."""
    rows, d = xs.shape
    per_dest = counts.reshape(n, -1).astype(jnp.int32)
    dest_total = jnp.sum(per_dest, axis=1)                        # [n]: what I send each device
    starts = jnp.cumsum(dest_total) - dest_total                  # where those rows start in xs
    sizes = jax.lax.all_gather(dest_total, axis)                  # [n sources, n destinations]
    me = jax.lax.axis_index(axis)
    before_me = jnp.sum(jnp.where(jnp.arange(n)[:, None] < me, sizes, 0), axis=0)  # my rows' offset at each dest
    recv_counts = jax.lax.all_to_all(per_dest, axis, 0, 0, tiled=True)  # [n sources, E/n]
    recv_total = sizes[:, me]                                     # [n sources]
    recv_starts = jnp.cumsum(recv_total) - recv_total
    buffer = jnp.zeros((n * rows, d), xs.dtype)                   # worst case: everyone sends me everything
    recv = _ragged_all_to_all(xs, buffer, starts, dest_total, before_me, recv_total, axis_name=axis)
    local_id = _local_groups(recv_starts, recv_total, recv_counts, n * rows)
    order = jnp.argsort(local_id, stable=True)
    out = ffn(recv[order], jnp.sum(recv_counts, axis=0))
    out = jnp.zeros_like(out).at[order].set(out)
    # back to each source, at the offset where that source kept the rows it sent me
    where_they_kept_mine = jax.lax.all_to_all(starts, axis, 0, 0, tiled=True)
    ys = _ragged_all_to_all(out, jnp.zeros_like(xs), recv_starts, recv_total, where_they_kept_mine,
                            dest_total, axis_name=axis)
    return ys, _sent_to_others(dest_total, axis)


EXCHANGE_FNS = {"padded": padded_exchange, "ragged": ragged_exchange}
