"""The grouped matmul of dropless MoE experts, chosen by `model.moe.impl`.

Rows [M, K] sorted by expert, with per-expert counts `group_sizes` [G], times stacked weights [G, K, N]:
row block g goes through weight g. Rows past sum(group_sizes) are padding and come out as zeros.

* `ragged_dot`: `jax.lax.ragged_dot`. On TPU, XLA lowers it to its own grouped matmul; on CPU JAX lowers it
  to a dense dot over a group-masked copy of the rows (G times the FLOPs, fine for the tiny models run
  there). On NVIDIA GPUs XLA's RaggedDotRewriter also expands it densely (G times the FLOPs), unless
  XLA_FLAGS=--xla_gpu_experimental_use_ragged_dot_fusion=true (a flag of this jaxlib; cuDNN >= 9.22) makes
  the forward-shaped products a cuDNN grouped GEMM (not measured here). It stays the GPU choice: the one
  in-tree GPU kernel, Mosaic GPU's `ragged_dot_mgpu` (Hopper only, bf16, forward only, no interpret flag),
  cannot be checked without a GPU, and tokamax is not a dependency (xprof, tensorboardx, qwix pins).
* `megablox`: JAX's in-tree Pallas TPU grouped matmul (`jax.experimental.pallas.ops.tpu.megablox`, the
  kernel MaxText uses): tiles of rows visit only their own expert's weights, with a custom VJP (`gmm` for
  the input gradient, `tgmm` for the weight gradient). Off TPU it runs in Pallas interpret mode, which is
  how the tests check it against `ragged_dot`.
* `auto`: megablox on TPU, ragged_dot elsewhere (CPU keeps the numerics of ragged_dot exactly).

A Mosaic kernel cannot be partitioned by the compiler, so with megablox the expert computation's shard_map
makes every mesh axis manual (`maxmodel.parallel.experts`), and it is refused inside pipeline stages, whose
shard_map leaves the other axes to the compiler (a nested shard_map does not lower once transposed).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from maxmodel.config.errors import ConfigError

from .mesh import platform

IMPLS = ("auto", "ragged_dot", "megablox")
KEY = "model.moe.impl"
ROW_ALIGN = 16    # row tiles are multiples of the TPU's sublane tile for bf16 (16 x 128; 8 x 128 for f32)
LANES = 128       # contraction / output tiles are multiples of the lane width when they split a dimension


def choose(impl: str, on: str | None = None) -> str:
    """The grouped matmul to run for `impl`: itself, or for `auto` the kernel of platform `on` (default: the
    one being compiled for). Called outside the expert shard_map: manual axes here mean a pipeline stage."""
    if impl not in IMPLS:
        raise ConfigError(KEY, f"{impl!r} is not one of {', '.join(IMPLS)}")
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.manual_axes:
        if impl == "megablox":
            raise ConfigError(KEY, "megablox is not supported inside pipeline stages (mesh.stage > 1): a "
                                   "Mosaic kernel needs every mesh axis manual; use auto or ragged_dot")
        return "ragged_dot"
    if impl == "auto":
        return "megablox" if (on or platform()) == "tpu" else "ragged_dot"
    return impl


def grouped_matmul(impl: str, tiles: tuple[int, int, int] = (512, 1024, 1024)):
    """fn(lhs [M, K], rhs [G, K, N], group_sizes [G], down=False) -> [M, N] for a resolved impl (`choose`).

    `tiles`: megablox's tile sizes (rows, embed, mlp), as MaxText's tile_batch_seq / tile_embed_dim /
    tile_mlp_dim: (rows, embed, mlp) for the up projections [D -> F], (rows, mlp, embed) for `down`."""
    if impl == "ragged_dot":
        return lambda lhs, rhs, group_sizes, down=False: jax.lax.ragged_dot(lhs, rhs, group_sizes)
    if impl != "megablox":
        raise ValueError(f"unresolved grouped matmul {impl!r}: call choose() first")
    rows, embed, mlp = tiles
    interpret = platform() != "tpu"
    return lambda lhs, rhs, group_sizes, down=False: _megablox(
        lhs, rhs, group_sizes, tiles=(rows, mlp, embed) if down else (rows, embed, mlp), interpret=interpret)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _megablox(lhs, rhs, group_sizes, *, tiles, interpret: bool):
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
    m, k = lhs.shape
    n = rhs.shape[2]
    # gmm needs the row count to be a multiple of the row tile (it raises otherwise), while a dropless
    # buffer holds tokens·k rows (n·tokens·k after the expert exchange): pad the rows, with one tile for a
    # small buffer. K and N need no padding: a tile clipped to its dimension is the whole dimension, and a
    # last partial tile of a larger one is masked (K) or cut at the edge (N) by the kernel.
    tm = min(tiles[0], _round_up(m, ROW_ALIGN))
    padded = _round_up(m, tm)
    # The K / N tiles are sized for 2-byte operands (MaxText's defaults are for bf16); 4-byte ones take half
    # of each, so the double-buffered blocks keep their bytes: at full tiles the float32 tgmm of a 1024 x 2048
    # expert needs 20 MiB of scoped VMEM against v5p's 16 MiB limit (seen in the ahead-of-time compile test).
    scale = jnp.dtype(lhs.dtype).itemsize // 2 or 1
    tk, tn = (max(LANES, t // scale // LANES * LANES) for t in tiles[1:])
    tiling = (tm, min(tk, k), min(tn, n))
    valid = (jnp.arange(padded) < jnp.sum(group_sizes))[:, None]
    # The kernel never writes rows past the last group (they hold whatever the buffer held: NaN in interpret
    # mode), in the output nor in its input gradient (also a gmm). Zero them as ragged_dot does: the output
    # here, the gradient through the `where` on the input (whose transpose selects, so NaN cannot leak).
    x = jnp.where(valid, jnp.pad(lhs, ((0, padded - m), (0, 0))), 0)
    out = megablox.gmm(x, rhs, group_sizes.astype(jnp.int32), lhs.dtype, tiling, None, None, False, interpret)
    return jnp.where(valid, out, 0)[:m]

