"""Logical-axis helpers for model code: parameter initialisers and activation constraints."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float | None = None,
          init=None, dtype=jnp.float32) -> nnx.Param:
    """A parameter carrying its logical axis names; sharded at creation under a mesh + rules context."""
    if init is None:
        init = nnx.initializers.normal(std) if std else nnx.initializers.zeros_init()
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, dtype))


def constant_param(shape: tuple[int, ...], axes: tuple[str | None, ...], value: float,
                   dtype=jnp.float32) -> nnx.Param:
    init = nnx.initializers.constant(value)
    return nnx.Param(nnx.with_partitioning(init, axes)(jax.random.key(0), shape, dtype))


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's sharding by logical names (a no-op outside a mesh + rules context)."""
    if not spmd.get_logical_axis_rules():
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = spmd.apply_rules(PartitionSpec(*axes), None)
    if mesh.manual_axes:  # inside a shard_map (pipeline stage): only the compiler-managed axes remain
        manual = set(mesh.manual_axes)
        def keep(entry):
            names = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,)) if a and a not in manual)
            return names if len(names) > 1 else (names[0] if names else None)
        spec = PartitionSpec(*(keep(e) for e in spec))
    return jax.lax.with_sharding_constraint(x, spec)
