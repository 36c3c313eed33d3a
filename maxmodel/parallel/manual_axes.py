"""Small helpers shared by the explicit schedules (ring attention, pipeline) that use `jax.shard_map`."""
from __future__ import annotations

import jax


def resolve_mesh(mesh):
    """The mesh to hand to shard_map.

    Inside another shard_map (ring attention inside a pipeline stage) some axes are already manual, and
    shard_map wants the context's abstract mesh, not the concrete one; with mesh=None, the mesh set by
    `jax.set_mesh` is used.
    """
    ctx = jax.sharding.get_abstract_mesh()
    if mesh is None or (not ctx.empty and ctx.manual_axes):
        if ctx.empty:
            raise ValueError("no mesh: pass mesh= or call under `with jax.set_mesh(mesh):`")
        return ctx
    return mesh


def varying_axes(*trees) -> tuple[str, ...]:
    """Manual mesh axes over which any leaf of `trees` varies (for typing loop carries under shard_map)."""
    axes = set()
    for leaf in jax.tree.leaves(trees):
        aval = jax.typeof(leaf)
        mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.12
        axes |= set(mat.varying if mat is not None else getattr(aval, "vma", ()))  # jax 0.11: .vma
    return tuple(sorted(axes))


def vary_over(tree, axes):
    """Mark every leaf of `tree` as varying over `axes` (the ones it does not vary over already)."""
    def one(leaf):
        missing = tuple(sorted(set(axes) - set(varying_axes(leaf))))
        return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf
    return jax.tree.map(one, tree)
