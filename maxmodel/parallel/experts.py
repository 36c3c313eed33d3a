"""Expert parallelism: the MoE expert computation per device, tokens exchanged with `all_to_all` over `expert`.

The routed tokens are split over the batch axes (data, fsdp, expert) and the expert weights over `expert`
(axis 0). Inside `jax.shard_map` the mesh axes that split tokens, and `expert`, are manual: each device sorts
or dispatches only its own tokens, and the token exchange is explicit. Other axes (tensor on the experts'
hidden dimension) stay with the compiler. A weight dimension sharded over a manual axis other than `expert`
(fsdp on `embed`) is all-gathered here, whose transpose reduce-scatters the gradient, as FSDP does.

Exchange, with n = mesh.expert devices and E/n experts per device:
* capacity: the [E, B, C, D] dispatch buffer is cut along E into n parts, one per device (all_to_all);
  each device runs its E/n experts on [E/n, n·B, C, D] and sends the results back the same way.
* dropless: token copies sorted by expert are contiguous per destination device; `model.moe.exchange`
  sends them as a worst-case padded buffer (`all_to_all`) or as exactly the routed rows
  (`ragged_all_to_all`), with the per-expert counts (token_exchange.py); the receiver sorts what it got by
  local expert and runs the grouped matmul over the groups; rows past the counts are padding, which the
  grouped matmul leaves as zeros.
Both report the token rows each device sent to the others (the MoE stat `sent_rows`, summed over devices).
Without a mesh, or with every relevant axis of size 1, the same per-device code runs on the whole arrays.

The grouped matmul is `model.moe.impl`'s (`grouped_matmul.py`). A Mosaic kernel (megablox) cannot be
partitioned by the compiler, so for it every mesh axis is manual here, even size-1 ones; the experts' hidden
dimension then stays split over the axes that do not split the tokens (tensor) and the outputs are summed
over them (Megatron), where the ragged_dot program leaves that dimension to the compiler.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax.core import spmd
from jax.sharding import PartitionSpec as P

from . import token_exchange
from .grouped_matmul import choose, grouped_matmul
from .manual_axes import resolve_mesh

AXIS = "expert"
W_AXES = (("exp", "embed", "exp_mlp"), ("exp", "embed", "exp_mlp"), ("exp", "exp_mlp", "embed"))
F_DIMS = (2, 2, 1)  # the hidden (exp_mlp) dimension of wi, wg, wo


def expert_ffn(x, wi, wg, wo, act, group_sizes=None, matmul=None):
    """Per-expert (gated) MLP. Grouped rows [N, D] with group_sizes [E] through `matmul` (a grouped matmul
    from `grouped_matmul`, default ragged_dot), or [E, ..., D] dense."""
    if group_sizes is not None:
        matmul = matmul or grouped_matmul("ragged_dot")
        h = matmul(x, wi, group_sizes)
        h = act(matmul(x, wg, group_sizes)) * h if wg is not None else act(h)
        return matmul(h, wo, group_sizes, down=True)
    h = jnp.einsum("e...d,edf->e...f", x, wi)
    h = act(jnp.einsum("e...d,edf->e...f", x, wg)) * h if wg is not None else act(h)
    return jnp.einsum("e...f,efd->e...d", h, wo)


def _names(entry) -> tuple[str, ...]:
    return tuple(a for a in (entry if isinstance(entry, tuple) else (entry,)) if a)


def _spec(axes) -> P:
    return spmd.apply_rules(P(*axes), None) if spmd.get_logical_axis_rules() else P(*([None] * len(axes)))


def _only(spec: P, manual: set) -> P:
    def keep(entry):
        names = tuple(a for a in _names(entry) if a in manual)
        return names if len(names) > 1 else (names[0] if names else None)
    return P(*(keep(e) for e in spec))


def _layout(kernel: bool = False):
    """(mesh, manual axes, token spec [B, L, D]) or None when no exchange is needed (and, for a Mosaic
    `kernel`, no other device either)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes:
        # Inside another shard_map (a pipeline stage): a nested one fails to lower once transposed ("axis
        # stage already bound by a parent manual computation"), so the dispatch runs on the stage's arrays as
        # they are and the partitioner moves tokens to the expert-sharded weights.
        return None
    tokens = _spec(("activation_batch", "activation_length", "activation_embed"))
    manual = {a for e in tokens for a in _names(e) if mesh.shape[a] > 1}
    if mesh.shape.get(AXIS, 1) > 1:
        if AXIS not in _names(tokens[0]):
            raise ValueError("mesh.expert > 1 needs the batch split over `expert` (activation_batch rule)")
        manual.add(AXIS)
    if kernel and mesh.size > 1:
        manual = set(mesh.axis_names)
    return (resolve_mesh(None), manual, tokens) if manual else None


def _gather_weights(weights, specs, split_f=()):
    """All-gather the non-expert dims of the local expert weights over manual axes (FSDP), but the hidden
    dim over `split_f` (each device keeps its hidden units; wi, wg and wo hold the same ones)."""
    out = []
    for w, spec, f_dim in zip(weights, specs, F_DIMS):
        if w is not None:
            for dim, entry in enumerate(spec):
                for axis in reversed(_names(entry)) if dim else ():
                    if dim != f_dim or axis not in split_f:
                        w = jax.lax.all_gather(w, axis, axis=dim, tiled=True)
        out.append(w)
    return out


def _run(body, x, token_args, weights, act, kernel: bool = False):
    """Call body(x, *token_args, weights, act, n) -> (y, rows sent) per device (shard_map) or on whole
    arrays; the rows are summed over devices. `kernel`: the body runs a Mosaic kernel, which needs every
    mesh axis manual."""
    layout = _layout(kernel)
    if layout is None:
        return body(x, *token_args, weights, act, 1)
    mesh, manual, tokens = layout
    n = mesh.shape[AXIS] if AXIS in manual else 1
    w_specs = [_only(_spec(a), manual) for a in W_AXES]
    x_spec = _only(tokens, manual)
    arg_specs = [P(*x_spec[:2], *([None] * (a.ndim - 2))) for a in token_args]
    present = [w is not None for w in weights]
    token_axes = {a for entry in x_spec for a in _names(entry)}
    split_f = tuple(a for a in _names(w_specs[0][F_DIMS[0]]) if a not in token_axes) if kernel else ()

    def per_device(x, args, ws):
        it = iter(ws)
        full = _gather_weights([next(it) if p else None for p in present], w_specs, split_f)
        out, sent = body(x, *args, full, act, n)
        out = jax.lax.psum(out, split_f) if split_f else out  # partial sums over the hidden units
        return out, jax.lax.psum(sent, tuple(sorted(token_axes)))
    ws = [w for w in weights if w is not None]
    specs = [s for s, p in zip(w_specs, present) if p]
    # check_vma=False for a Pallas kernel: its outputs carry no varying-axes type (megablox builds them)
    return jax.shard_map(per_device, mesh=mesh, in_specs=(x_spec, arg_specs, specs), out_specs=(x_spec, P()),
                         axis_names=manual, check_vma=not kernel)(x, list(token_args), ws)


def _capacity_body(x, dispatch, combine, weights, act, n):
    ein = jnp.einsum("blec,bld->ebcd", dispatch, x)
    if n > 1:  # [E, B, C, D] -> [E/n, n·B, C, D]: my experts, everyone's tokens
        ein = jax.lax.all_to_all(ein, AXIS, split_axis=0, concat_axis=1, tiled=True)
    out = expert_ffn(ein, *weights, act)
    if n > 1:
        out = jax.lax.all_to_all(out, AXIS, split_axis=1, concat_axis=0, tiled=True)
    e, b, c, _ = ein.shape  # (n-1)/n of the [E, B, C, D] buffer leaves the device
    sent = (n - 1) * e * (b // n) * c if n > 1 else 0
    return jnp.einsum("blec,ebcd->bld", combine, out), jnp.asarray(sent, jnp.int32)


def _dropless_body(x, ids, weights_k, weights, act, n, matmul, exchange):
    b, l, d = x.shape
    k = ids.shape[-1]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    xs = x.reshape(b * l, d)[order // k]
    counts = jnp.bincount(flat, length=weights[0].shape[0] * n)

    def ffn(rows, group_sizes):
        return expert_ffn(rows, *weights, act, group_sizes=group_sizes, matmul=matmul)
    if n > 1:
        ys, sent = token_exchange.EXCHANGE_FNS[exchange](ffn, xs, counts, n, AXIS)
    else:
        ys, sent = ffn(xs, counts), jnp.zeros((), jnp.int32)
    copies = jnp.zeros_like(ys).at[order].set(ys).reshape(b * l, k, d)
    return jnp.einsum("tkd,tk->td", copies, weights_k.reshape(b * l, k)).reshape(b, l, d), sent


def dropless_experts(x, ids, weights_k, weights, act, impl: str = "auto", tiles=(512, 1024, 1024),
                     exchange: str = "auto"):
    """x [B, L, D], ids / weights_k [B, L, k], weights (wi, wg or None, wo) -> (y [B, L, D], token rows sent
    to other devices over `expert`, summed over devices); `impl` / `tiles`: model.moe.impl and megablox's
    (rows, embed, mlp) tiles (grouped_matmul.py); `exchange`: model.moe.exchange (token_exchange.py)."""
    impl = choose(impl)  # here, outside the shard_map: manual axes now mean a pipeline stage
    body = functools.partial(_dropless_body, matmul=grouped_matmul(impl, tiles),
                             exchange=token_exchange.choose(exchange))
    return _run(body, x, (ids, weights_k), weights, act, kernel=impl == "megablox")


def capacity_experts(x, dispatch, combine, weights, act):
    """x [B, L, D], dispatch / combine [B, L, E, C] -> (y [B, L, D], token rows sent to other devices)."""
    return _run(_capacity_body, x, (dispatch, combine), weights, act)

