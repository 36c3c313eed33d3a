"""Pipeline parallelism over one mesh axis (default `stage`) for a stack of identical layers.

`pipeline_apply(layer_fn, stacked_params, x, ...)` computes the same result as applying the layers one after
another (`for i in range(L): x = layer_fn(params[i], x)`), but with the layers split over the devices of the
`stage` axis and the batch split into microbatches that flow through the stages.

Implementation choice: `jax.shard_map` with only `stage` manual + `jax.lax.ppermute`
-----------------------------------------------------------------------------------------
The alternative, vmap over a stage dimension with `spmd_axis_name` and a roll of the state, leaves it to the
partitioner to turn the roll into a collective-permute and to keep each stage's compute on its own devices.
With shard_map the schedule is written per device: each stage sees exactly its own layers, the hand-off to
the next stage is an explicit `ppermute` (a collective-permute in the HLO), and the schedule is in the program
rather than inferred by the partitioner.
Since only `stage` is manual, `data`, `fsdp` and `tensor` shardings of the batch and of the parameters' other
dimensions are still handled by the compiler (GSPMD) inside each stage, so the pipeline composes with them.

Schedule
--------
S stages (devices along `stage`), R repeats, M microbatches. The L layers are cut into S·R virtual stages of
L/(S·R) consecutive layers; virtual stage v = r·S + s lives on device s (round-robin, "circular" or
"interleaved"); R = 1 is GPipe. Time advances in ticks of one virtual stage. At tick t, device s works on item
w = t - s, i.e. microbatch w mod M in repeat w div M, when 0 <= w < M·R. After each tick every device
passes its output to device s+1 (mod S) with one ppermute. Device 0 takes fresh microbatches from a buffer
and writes back what arrives from device S-1: after a non-final repeat the microbatch goes around again,
after the final repeat it is the output. Microbatch m's next repeat starts M ticks after its previous one,
and its result needs S ticks to come round, so repeats > 1 need M >= S (no extra waiting then).
Total ticks M·R + S - 1, of which each device idles S - 1: the bubble fraction (S-1)/(M·R+S-1)
(`bubble_fraction`). More repeats shrink the bubble at the price of R times more ppermutes of activations.
Auxiliary per-example inputs (segment ids, positions) do not travel: every stage holds them all (they are
replicated over `stage`) and picks the microbatch it is working on. With `length_axis="sequence"`, the
sequence axis is manual inside the stages too: layer_fn sees length blocks, and context-parallel attention
(`maxmodel.parallel.ring_attention`) called from it works on them directly.

Memory trade-off
----------------
Parameters: each device holds L/S layers (plus their gradients and optimizer state), the reason to
pipeline. Activations: the backward pass is plain autodiff through the tick loop, i.e. all forward ticks,
then all backward ticks (GPipe style, not 1F1B), so each device keeps its layers' residuals for every tick:
(M·R + S - 1) ticks × L/(S·R) layers × one microbatch, about the whole batch through L/S layers. Wrap
`layer_fn` in `jax.checkpoint` to keep only each layer's input and recompute the rest in the backward pass.
More microbatches shrink the bubble but not this total; the 1F1B schedules (pipeline_1f1b.py) cap it at S
microbatches in flight with explicit per-stage backward steps.
The microbatch buffer (inputs, then outputs, [B, ...]) is replicated over `stage`.

Parameter order for the circular schedule
-----------------------------------------
Device s needs layers of virtual stages s, S+s, 2S+s, ...; if the stacked parameters are sharded over
`stage` in natural layer order, every call reshuffles them (an all-to-all of the weights and, in the
backward pass, of their gradients). To avoid it, store the stack permuted by `stage_major_order(...)`
(layers are i.i.d. at initialisation, so only imported checkpoints need the permutation) and pass
`stage_major=True`. For GPipe (repeats=1) the natural order already is stage-major.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from maxmodel.parallel.manual_axes import resolve_mesh, vary_over, varying_axes


def bubble_fraction(num_stages: int, num_microbatches: int, repeats: int = 1) -> float:
    """Idle fraction of each device's time: (S-1)/(M·R+S-1); GPipe is repeats=1."""
    s, m, r = num_stages, num_microbatches, repeats
    if min(s, m, r) < 1:
        raise ValueError(f"num_stages={s}, num_microbatches={m} and repeats={r} must all be >= 1")
    return (s - 1) / (m * r + s - 1)


def stage_major_order(num_layers: int, num_stages: int, repeats: int = 1) -> np.ndarray:
    """Layer permutation giving device s its virtual stages s, S+s, ... as one contiguous block.

    `stacked[order]` sharded over `stage` in equal contiguous blocks is the layout `stage_major=True` expects.
    """
    if num_layers % (num_stages * repeats):
        raise ValueError(f"num_layers={num_layers} is not divisible by stages*repeats={num_stages}*{repeats}")
    per = num_layers // (num_stages * repeats)
    # Entry (s, r, j) of the stage-major stack is layer (r*S + s)*per + j of the natural stack.
    return np.arange(num_layers).reshape(repeats, num_stages, per).swapaxes(0, 1).reshape(-1)



def _leading_dim(tree, what):
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(tree)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"every leaf of {what} needs the same leading dimension; got sizes {sorted(map(str, sizes))}")
    return sizes.pop()


def _validate(stacked_params, x, aux, mesh, axis_name, num_stages, num_microbatches, repeats):
    if axis_name not in mesh.axis_names:
        raise ValueError(f"mesh axis {axis_name!r} not in mesh axes {mesh.axis_names}")
    if mesh.shape[axis_name] != num_stages:
        raise ValueError(f"num_stages={num_stages} but mesh axis {axis_name}={mesh.shape[axis_name]}")
    bubble_fraction(num_stages, num_microbatches, repeats)  # range checks
    num_layers = _leading_dim(stacked_params, "stacked_params")
    if num_layers % (num_stages * repeats):
        raise ValueError(f"num_layers={num_layers} is not divisible by stages*repeats="
                         f"{num_stages}*{repeats}")
    batch = x.shape[0]
    if batch % num_microbatches:
        raise ValueError(f"batch size {batch} is not divisible by num_microbatches={num_microbatches}")
    if aux is not None and _leading_dim(aux, "aux") != batch:
        raise ValueError(f"aux leaves need the batch size {batch} as leading dimension")
    if repeats > 1 and num_microbatches < num_stages:
        raise ValueError(f"the circular schedule needs num_microbatches >= num_stages; got "
                         f"num_microbatches={num_microbatches} < num_stages={num_stages}")
    return num_layers


def _index(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def _add_at(tree, i, delta):
    """tree with delta added at index i of every leaf's leading axis."""
    return jax.tree.map(lambda a, d: jax.lax.dynamic_update_index_in_dim(
        a, jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False) + d.astype(a.dtype), i, 0), tree, delta)


def _to_microbatches(a, m):
    # Microbatch j holds rows j, j+M, j+2M, ...: a batch dimension sharded in contiguous blocks (data/fsdp)
    # stays sharded on the per-microbatch dimension without any data movement.
    return jnp.moveaxis(a.reshape(a.shape[0] // m, m, *a.shape[1:]), 1, 0)


def _from_microbatches(a):
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _stage_loop(params, xs, aux, *, layer_fn, axis_name, num_stages, num_microbatches, repeats, with_stats):
    """Per-device body: params [1, R, L/(S·R), ...] (this device's virtual stages), xs [M, mb, ...]. With
    `with_stats`, layer_fn returns (x, stats) and each layer's stats come back summed over microbatches as
    [1, R, L/(S·R), ...]."""
    S, M, R = num_stages, num_microbatches, repeats
    s = jax.lax.axis_index(axis_name)
    params = jax.tree.map(lambda p: p[0], params)
    # Loop carries vary over `stage` and over whatever manual axes the inputs already vary over.
    vary = {axis_name, *varying_axes(params, xs, aux)}
    buf = vary_over(xs, vary)  # device 0's microbatch queue: inputs, then partial results, then outputs
    state = vary_over(jnp.zeros_like(xs[0]), vary)  # what arrived from the previous stage
    ring = [(i, (i + 1) % S) for i in range(S)]

    def layer(p, h, aux_m):
        out = layer_fn(p, h) if aux is None else layer_fn(p, h, aux_m)
        return out if with_stats else (out, {})

    def apply_layers(stage_params, h, aux_m):
        return jax.lax.scan(lambda h, p: layer(p, h, aux_m), h, stage_params)  # (h, stats [L/(S·R), ...])

    aux0 = None if aux is None else jax.tree.map(lambda a: a[0], aux)
    _, stats_shape = jax.eval_shape(apply_layers, jax.tree.map(lambda p: p[0], params), state, aux0)
    stats0 = vary_over(jax.tree.map(lambda a: jnp.zeros((R, *a.shape), a.dtype), stats_shape), vary)

    def tick(carry, t):
        buf, state, stats = carry
        w = t - s  # work item of this device at this tick
        m, r = w % M, jnp.clip(w // M, 0, R - 1)
        h = jnp.where(s == 0, jax.lax.dynamic_index_in_dim(buf, t % M, 0, keepdims=False), state)
        aux_m = None if aux is None else jax.tree.map(
            lambda a: jax.lax.dynamic_index_in_dim(a, m, 0, keepdims=False), aux)
        stage_params = jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, r, 0, keepdims=False), params)
        out, layer_stats = apply_layers(stage_params, h, aux_m)
        active = (w >= 0) & (w < M * R)
        out = jnp.where(active, out, 0.0)  # idle ticks (bubble) pass zeros
        stats = _add_at(stats, r, jax.tree.map(lambda new: jnp.where(active, new, 0), layer_stats))
        arrived = jax.lax.ppermute(out, axis_name, ring)
        # On device 0, `arrived` is device S-1's result for item t-(S-1): queue it for its next repeat
        # (or keep it as the output after the last one).
        w_last = t - (S - 1)
        keep = (s == 0) & (w_last >= 0)  # w_last < M·R always: t < M·R + S - 1
        slot = w_last % M
        old = jax.lax.dynamic_index_in_dim(buf, slot, 0, keepdims=False)
        buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(keep, arrived, old), slot, 0)
        return (buf, arrived, stats), None

    (buf, _, stats), _ = jax.lax.scan(tick, (buf, state, stats0), jnp.arange(M * R + S - 1))
    # Only device 0 holds the outputs; the sum over stages hands them to every stage (adds exact zeros).
    out = jax.lax.psum(jnp.where(s == 0, buf, jnp.zeros_like(buf)), axis_name)
    return out, jax.tree.map(lambda a: a[None], stats)


def pipeline_apply(layer_fn, stacked_params, x, *, mesh=None, num_stages, num_microbatches, repeats=1, aux=None,
                   axis_name="stage", stage_major=False, length_axis=None, with_stats=False):
    """Apply L stacked layers to x as a pipeline over mesh axis `axis_name`.

    layer_fn(params_of_one_layer, x) -> x, or layer_fn(params, x, aux) when `aux` is given, where `aux` is a
    pytree of per-example arrays ([B, ...], e.g. segment ids and positions) cut into microbatches like x.
    layer_fn must treat batch rows independently (no batch statistics). stacked_params: pytree whose leaves
    have the layer index as leading dimension [L, ...], as `nnx.scan`/`nnx.vmap` produce. x: [B, ...].
    Layers are split into num_stages × repeats virtual stages (repeats=1: GPipe; > 1: circular).
    stage_major=True: stacked_params are in `stage_major_order` (see the module docstring).
    length_axis: a mesh axis (e.g. "sequence") over which dimension 1 of x and of every aux leaf is
    sharded, made manual together with `axis_name`: layer_fn then sees this device's length block, and
    ring/all-gather attention called inside it works on those blocks directly.
    with_stats: layer_fn returns (x, stats), a pytree of per-layer arrays (MoE load and aux losses), and the
    result is (output, stats) with each stats leaf [L, ...] in stack order, averaged over microbatches.
    """
    mesh = resolve_mesh(mesh)
    num_layers = _validate(stacked_params, x, aux, mesh, axis_name, num_stages, num_microbatches, repeats)
    if length_axis is not None:
        if length_axis not in mesh.axis_names:
            raise ValueError(f"length_axis {length_axis!r} not in mesh axes {mesh.axis_names}")
        for a in jax.tree.leaves((x, aux)):
            if a.ndim < 2 or a.shape[1] % mesh.shape[length_axis]:
                raise ValueError(f"dimension 1 of an input of shape {a.shape} is not divisible by mesh axis "
                                 f"{length_axis}={mesh.shape[length_axis]}")
    S, R = num_stages, repeats
    per_stage = num_layers // (S * R)

    def by_stage(p):  # [L, ...] -> [S, R, L/(S·R), ...]; virtual stage r·S + s on device s
        if stage_major:
            return p.reshape(S, R, per_stage, *p.shape[1:])
        return jnp.swapaxes(p.reshape(R, S, per_stage, *p.shape[1:]), 0, 1)

    params = jax.tree.map(by_stage, stacked_params)
    xs = _to_microbatches(x, num_microbatches)
    aux_mb = None if aux is None else jax.tree.map(lambda a: _to_microbatches(a, num_microbatches), aux)
    body = functools.partial(_stage_loop, layer_fn=layer_fn, axis_name=axis_name, num_stages=S,
                             num_microbatches=num_microbatches, repeats=R, with_stats=with_stats)
    param_specs = jax.tree.map(lambda _: P(axis_name), params)
    act_spec = P() if length_axis is None else P(None, None, length_axis)  # [M, mb, length, ...]
    aux_specs = None if aux is None else jax.tree.map(lambda _: act_spec, aux_mb)
    manual = {axis_name} if length_axis is None else {axis_name, length_axis}
    out, stats = jax.shard_map(body, mesh=mesh, in_specs=(param_specs, act_spec, aux_specs),
                               out_specs=(act_spec, P(axis_name)), axis_names=manual)(params, xs, aux_mb)
    if not with_stats:
        return _from_microbatches(out)

    def stack_order(a):  # [S, R, L/(S·R), ...] -> [L, ...], the inverse of by_stage; a mean over microbatches
        a = a.reshape(num_layers, *a.shape[3:]) if stage_major else jnp.swapaxes(a, 0, 1).reshape(
            num_layers, *a.shape[3:])
        return a / num_microbatches
    return _from_microbatches(out), jax.tree.map(stack_order, stats)
