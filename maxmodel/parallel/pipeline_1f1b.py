"""1F1B and interleaved 1F1B pipelines: the loss of a layer stack and its head, with the gradients made by
explicit per-stage forward and backward steps (schedules.py) instead of autodiff through a tick loop.

`pipeline_loss(stage_fn, tail_fn, params, tail_params, x, aux, tail_aux, ...)` returns what
`tail_fn(tail_params, stack(x), tail_aux)` returns summed over microbatches: (the summed objective, a dict of
summed metrics). It is a `jax.custom_vjp` function whose forward runs the whole schedule inside
`jax.shard_map` (only `stage` manual, as in pipeline.py) and computes the gradients with respect to `params`,
`tail_params` and `x` on the way; its backward scales them by the objective's cotangent. So the caller's
`jax.value_and_grad` works unchanged, autodiff carries on into whatever made `x` (the embedding), and the
step never differentiates through the ticks.

Per tick each device runs one step of the table, under `jax.lax.switch`:
- forward F(m, v): the chunk's layers on the microbatch's activation (from the pipeline input on virtual
  stage 0, else from a mailbox slot), sent to the next device; the input is kept in a stash slot;
- backward B(m, v): the chunk recomputed from its stashed input under `jax.vjp` (on the last virtual stage
  together with `tail_fn`, whose objective is the start of the backward), its parameter gradients added up,
  and the input's cotangent sent to the previous device (or, on virtual stage 0, kept as x's gradient).
- zero bubble: the backward as two steps, each recomputing the chunk: B(m, v) only the input's cotangent
  (under `jax.vjp` of the input alone), W(m, v) later only the parameters' gradients, from the same stashed
  input and the cotangent B kept in a slot.
After the step every device passes activations one way and cotangents the other (two `ppermute`s).

Memory: the stash holds at most the schedule's cap of stage inputs ([mb, ...] each), whatever the number
of microbatches, and only one backward's residuals exist at a time: activation memory stays flat as M
grows, where GPipe's autodiff keeps every tick's. The price is one extra forward of each chunk (the
recompute), as with stage-level rematerialisation. The pipeline input, x's gradient and the tail's
per-example inputs are [B, ...] buffers replicated over `stage`, as in pipeline.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from .manual_axes import resolve_mesh, vary_over, varying_axes
from .pipeline import _add_at, _from_microbatches, _index, _to_microbatches, _validate
from .schedules import BACKWARD, FORWARD, WEIGHT, Schedule, make_schedule


def _zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _set_at(a, i, value, when):
    old = jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(a, jnp.where(when, value, old), i, 0)


def _run(stage_fn, tail_fn, sched: Schedule, axis_name, with_stats, params, tail_params, xs, aux, tail_aux,
         weights):
    """Per-device body: params ([1, R, L/(S·R), ...] leaves) as (the floating ones, which get gradients, the
    others: quantized codes); xs [M, mb, ...]; aux / tail_aux leaves [M, mb, ...]. With `with_stats`,
    stage_fn returns (h, stats) and `weights` (one layer's stats shapes) make Σ <stats, weights> part of the
    objective."""
    S, R = sched.stages, sched.repeats
    V = S * R
    s = jax.lax.axis_index(axis_name)
    # Every input arrives cut along `stage` (one copy per device), so everything varies over it from the
    # start: a value made varying inside a backward step would transpose to a psum that only the devices
    # taking that branch reach, and a pcast of an array also sharded over automatic axes (fsdp, tensor)
    # trips XLA's SPMD partitioner.
    params, tail_params, xs, aux, tail_aux, weights = jax.tree.map(
        lambda p: p[0], (params, tail_params, xs, aux, tail_aux, weights))
    vary = {axis_name, *varying_axes(params, xs, aux, tail_params, tail_aux)}
    split = sched.split_backward
    tables = {k: jnp.asarray(getattr(sched, k)) for k in ("op", "mb", "rep", "src", "stash", "recv_f", "recv_b")
              + (("ct",) if split else ())}
    act = vary_over(jnp.zeros_like(xs[0]), vary)

    def layer(p, h, aux_m):
        out = stage_fn(p, h, aux_m)
        h, stats = out if with_stats else (out, {})
        return h, vary_over(stats, vary)  # (a constant stat would not vary; its cotangent from `weights` does)

    def chunk(p, h, aux_m):  # -> (h, per-layer stats [L/(S·R), ...])
        h = vary_over(h, vary)
        return jax.lax.scan(lambda h, p_layer: layer(p_layer, h, aux_m), h, p)

    def weighted(stats):  # the stats' share of the objective (tree.map: weights must match the stats' keys)
        terms = jax.tree.leaves(jax.tree.map(lambda a, w: jnp.sum(a * w), stats, weights))
        return sum(terms, jnp.zeros((), jnp.float32))

    def tail_objective(p, tp, h, aux_m, tail_m):
        h, stats = chunk(p, h, aux_m)
        total, metrics = tail_fn(tp, h, tail_m)
        return total + weighted(stats), (metrics, stats)

    _, (metrics0, stats0) = jax.eval_shape(tail_objective, _index(params, 0), tail_params, act, _index(aux, 0),
                                           _index(tail_aux, 0))
    metrics0, stats0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (metrics0, stats0))
    zero_grads = (_zeros(_index(params[0], 0)), _zeros(tail_params))

    def varying(*out):  # branches of one switch / cond must agree on what varies over the manual axes
        return vary_over(out, vary)

    def idle(x, ct, p, aux_m, tail_m, last):
        return varying(act, act, zero_grads, jnp.zeros((), jnp.float32), metrics0, stats0)

    def forward(x, ct, p, aux_m, tail_m, last):  # the last virtual stage sends nothing: its backward recomputes
        y = jax.lax.cond(last, lambda: act, lambda: varying(chunk(p, x, aux_m)[0])[0])
        return varying(y, act, zero_grads, jnp.zeros((), jnp.float32), metrics0, stats0)

    def stats_ct(stats):  # the stats' cotangent is their weight: their share of the objective is linear
        return jax.tree.map(lambda a, w: jnp.broadcast_to(w, a.shape).astype(a.dtype), stats, weights)

    def backward(x, ct, p, aux_m, tail_m, last):
        if split:
            return input_backward(x, ct, p, aux_m, tail_m, last)

        def from_loss():
            out, vjp = jax.vjp(lambda pf, tp, h: tail_objective((pf, p[1]), tp, h, aux_m, tail_m), p[0],
                               tail_params, x)
            total, (metrics, stats) = out
            gp, gt, gx = vjp((jnp.ones_like(total), _zeros((metrics, stats))))
            return varying(gx, (gp, gt), total.astype(jnp.float32), metrics, stats)

        def from_next():
            (_, stats), vjp = jax.vjp(lambda pf, h: chunk((pf, p[1]), h, aux_m), p[0], x)
            gp, gx = vjp((ct, stats_ct(stats)))
            return varying(gx, (gp, zero_grads[1]), weighted(stats), metrics0, stats)
        gx, grads, total, metrics, stats = jax.lax.cond(last, from_loss, from_next)
        return varying(act, gx, grads, total, metrics, stats)

    # Zero bubble: the backward split in two recomputing steps, the input's cotangent first (the previous
    # device waits for it), the parameters' gradients later, from the same stashed input and cotangent.
    def input_backward(x, ct, p, aux_m, tail_m, last):
        def from_loss():
            out, vjp = jax.vjp(lambda h: tail_objective(p, tail_params, h, aux_m, tail_m), x)
            total, (metrics, stats) = out
            (gx,) = vjp((jnp.ones_like(total), _zeros((metrics, stats))))
            return varying(gx, total.astype(jnp.float32), metrics, stats)

        def from_next():
            (_, stats), vjp = jax.vjp(lambda h: chunk(p, h, aux_m), x)
            (gx,) = vjp((ct, stats_ct(stats)))
            return varying(gx, weighted(stats), metrics0, stats)
        gx, total, metrics, stats = jax.lax.cond(last, from_loss, from_next)
        return varying(act, gx, zero_grads, total, metrics, stats)

    def weight(x, ct, p, aux_m, tail_m, last):
        def from_loss():
            out, vjp = jax.vjp(lambda pf, tp: tail_objective((pf, p[1]), tp, x, aux_m, tail_m), p[0], tail_params)
            return varying(*vjp((jnp.ones_like(out[0]), _zeros(out[1]))))

        def from_next():
            (_, stats), vjp = jax.vjp(lambda pf: chunk((pf, p[1]), x, aux_m), p[0])
            (gp,) = vjp((ct, stats_ct(stats)))
            return varying(gp, zero_grads[1])
        grads = jax.lax.cond(last, from_loss, from_next)
        return varying(act, act, grads, jnp.zeros((), jnp.float32), metrics0, stats0)

    def tick(carry, t):
        stash, cts, mail_f, mail_b, grads, tail_grads, total, metrics, dxs, layer_stats = carry
        row = {k: v[t, s] for k, v in tables.items()}
        op, m, r = row["op"], row["mb"], row["rep"]
        v = r * S + s
        x_in = jnp.where(row["src"] < 0, _index(xs, m), _index(mail_f, jnp.maximum(row["src"], 0)))
        x = jnp.where(op >= BACKWARD, _index(stash, jnp.maximum(row["stash"], 0)), x_in)
        ct = _index(mail_b, jnp.maximum(row["src"], 0))
        if split:  # a weight step takes the cotangent its backward kept
            ct_slot = jnp.maximum(row["ct"], 0)
            ct = jnp.where(op == WEIGHT, _index(cts, ct_slot), ct)
            cts = _set_at(cts, ct_slot, ct, op == BACKWARD)
        args = (x, ct, _index(params, r), _index(aux, m), _index(tail_aux, m), v == V - 1)
        steps = (idle, forward, backward) + ((weight,) if split else ())
        y, gx, (gp, gt), d_total, d_metrics, d_stats = jax.lax.switch(op, steps, *args)
        layer_stats = _add_at(layer_stats, r, d_stats)
        stash = _set_at(stash, jnp.maximum(row["stash"], 0), x_in, op == FORWARD)
        grads = _add_at(grads, r, gp)
        tail_grads = jax.tree.map(jnp.add, tail_grads, gt)
        total = total + d_total
        metrics = jax.tree.map(jnp.add, metrics, d_metrics)
        dxs = _set_at(dxs, m, gx, (op == BACKWARD) & (v == 0))
        sent_f = jax.lax.ppermute(y, axis_name, [(i, (i + 1) % S) for i in range(S)])
        sent_b = jax.lax.ppermute(gx, axis_name, [(i, (i - 1) % S) for i in range(S)])
        mail_f = _set_at(mail_f, jnp.maximum(row["recv_f"], 0), sent_f, row["recv_f"] >= 0)
        mail_b = _set_at(mail_b, jnp.maximum(row["recv_b"], 0), sent_b, row["recv_b"] >= 0)
        return (stash, cts, mail_f, mail_b, grads, tail_grads, total, metrics, dxs, layer_stats), None

    def slots(n):
        return jnp.zeros((n, *act.shape), act.dtype)
    carry = (slots(sched.stash_slots), slots(sched.ct_slots if split else 0), slots(sched.mail_f_slots),
             slots(sched.mail_b_slots), _zeros(params[0]),
             _zeros(tail_params), jnp.zeros((), jnp.float32), metrics0, jnp.zeros_like(xs),
             jax.tree.map(lambda a: jnp.zeros((R, *a.shape), a.dtype), stats0))
    carry, _ = jax.lax.scan(tick, vary_over(carry, vary), jnp.arange(sched.ticks))
    _, _, _, _, grads, tail_grads, total, metrics, dxs, layer_stats = carry
    total, metrics = jax.lax.psum((total, metrics), axis_name)
    # the tail's gradients leave per device and are summed outside: a psum over `stage` of arrays that
    # are also sharded over automatic axes (fsdp, tensor) trips XLA's SPMD partitioner
    return (total, metrics, jax.tree.map(lambda g: g[None], grads), jax.tree.map(lambda g: g[None], tail_grads),
            dxs[None], jax.tree.map(lambda a: a[None], layer_stats))


def pipeline_loss(stage_fn, tail_fn, params, tail_params, x, aux, tail_aux, *, num_stages: int,
                  num_microbatches: int, repeats: int = 1, mesh=None, axis_name: str = "stage",
                  stats_weights=None, split_backward: bool = False):
    """(summed objective, summed metrics) of `tail_fn(tail_params, h, tail_aux_m) -> (objective, metrics)`
    over microbatches m, h the stack of `stage_fn(layer_params, h, aux_m)` layers applied to x's rows of m;
    differentiable in params ([L, ...] leaves, natural layer order), tail_params and x. repeats > 1:
    interleaved 1F1B with R chunks per device (virtual stage r·S + s on device s). Returns (objective, metrics,
    per-layer stats). With `stats_weights` (constants shaped like one layer's stats, e.g. MoE aux-loss
    weights), stage_fn returns (h, stats), the objective gains Σ over layers and microbatches of
    <stats, stats_weights>, and the stats come back [L, ...] in layer order, averaged over microbatches.
    `split_backward`: the zero-bubble schedule (schedules.py), each backward as an input step and a weight
    step."""
    mesh = resolve_mesh(mesh)
    with_stats = stats_weights is not None
    weights = jax.lax.stop_gradient(stats_weights) if with_stats else {}
    leaves, treedef = jax.tree.flatten(params)
    floating = [jnp.issubdtype(a.dtype, jnp.inexact) for a in leaves]

    def split(tree):  # -> (floating leaves, the others)
        flat = treedef.flatten_up_to(tree)
        return [a for a, f in zip(flat, floating) if f], [a for a, f in zip(flat, floating) if not f]

    def join(parts):
        fl, other = iter(parts[0]), iter(parts[1])
        return treedef.unflatten([next(fl) if f else next(other) for f in floating])
    num_layers = _validate(params, x, aux, mesh, axis_name, num_stages, num_microbatches, 1)
    S, M, R = num_stages, num_microbatches, repeats
    if num_layers % (S * R):
        raise ValueError(f"num_layers={num_layers} is not divisible by stages*repeats={S}*{R}")
    sched = make_schedule(S, M, R, split_backward=split_backward)
    per = num_layers // (S * R)

    def by_stage(p):  # [L, ...] -> [S, R, L/(S·R), ...]: chunk r of device s is virtual stage r·S + s
        return jnp.swapaxes(p.reshape(R, S, per, *p.shape[1:]), 0, 1)

    def from_stage(g):
        return jnp.swapaxes(g, 0, 1).reshape(num_layers, *g.shape[3:])

    def run(params, tail_params, x, aux, tail_aux, weights):
        body = functools.partial(_run, lambda parts, h, a: stage_fn(join(parts), h, a), tail_fn, sched, axis_name,
                                 with_stats)
        staged = jax.tree.map(by_stage, split(params))
        mbs = [jax.tree.map(lambda a: _to_microbatches(a, M), t) for t in (x, aux, tail_aux)]
        copies = jax.tree.map(lambda a: jnp.broadcast_to(a[None], (S, *a.shape)), (tail_params, *mbs, weights))
        total, metrics, grads, tail_grads, dxs, stats = jax.shard_map(
            body, mesh=mesh, in_specs=jax.tree.map(lambda _: P(axis_name), (staged, *copies)),
            out_specs=(P(), P(), jax.tree.map(lambda _: P(axis_name), staged[0]),
                       jax.tree.map(lambda _: P(axis_name), tail_params), P(axis_name), P(axis_name)),
            axis_names={axis_name})(staged, *copies)
        tail_grads = jax.tree.map(lambda g: g.sum(axis=0), tail_grads)
        others = [np.zeros(a.shape, jax.dtypes.float0) for a, f in zip(leaves, floating) if not f]
        stats = jax.tree.map(lambda a: from_stage(a) / M, stats)
        return (total, metrics, stats), (join((jax.tree.map(from_stage, grads), others)), tail_grads,
                                         _from_microbatches(dxs[0]))

    @jax.custom_vjp
    def loss(params, tail_params, x, aux, tail_aux, weights):
        return run(params, tail_params, x, aux, tail_aux, weights)[0]

    def fwd(params, tail_params, x, aux, tail_aux, weights):
        out, grads = run(params, tail_params, x, aux, tail_aux, weights)
        return out, (grads, aux, tail_aux, weights)

    def bwd(res, cts):  # the metrics' and stats' cotangents are not used: the objective's weights were fixed
        (g_params, g_tail, g_x), aux, tail_aux, weights = res
        scale = cts[0]

        def scaled(tree):  # (float0 cotangents of integer leaves stay as they are)
            return jax.tree.map(lambda g: g if g.dtype == jax.dtypes.float0 else (g * scale).astype(g.dtype), tree)

        def none_for(tree):  # integer inputs (ids, masks) get no cotangent
            return jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0) if not
                                jnp.issubdtype(a.dtype, jnp.inexact) else jnp.zeros_like(a), tree)
        return (scaled(g_params), scaled(g_tail), scaled(g_x), none_for(aux), none_for(tail_aux),
                none_for(weights))

    loss.defvjp(fwd, bwd)
    return loss(params, tail_params, x, aux, tail_aux, weights)
