"""Dropless expert exchange (model.moe.exchange): ragged_all_to_all's emulation keeps the collective's
documented semantics, the ragged exchange gives the padded one's values and gradients, and the rows it sends
are exactly the token copies routed to another device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_train_step import run_steps

from maxmodel.config import ConfigError, load_config
from maxmodel.models.moe import MoE
from maxmodel.parallel import token_exchange
from maxmodel.parallel.mesh import build_mesh
from maxmodel.parallel.rules import logical_rules


def _per_device(fn, n, *args):
    mesh = jax.make_mesh((n,), ("x",), devices=jax.devices()[:n])
    args = [jax.device_put(a, jax.NamedSharding(mesh, P("x"))) for a in args]
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("x"), out_specs=P("x")))(*args)


def test_emulation_gives_the_documented_example():
    """The example of jax.lax.ragged_all_to_all's docstring, on an axis of size 2."""
    operand = jnp.array([[1, 2, 2], [3, 4, 0]], jnp.float32)
    args = [jnp.array(a, jnp.int32) for a in ([[0, 1], [0, 1]], [[1, 2], [1, 1]], [[0, 0], [1, 2]],
                                              [[1, 1], [2, 1]])]

    def fn(op, in_off, send, out_off, recv):
        return token_exchange.emulated_ragged_all_to_all(op[0], jnp.zeros(4), in_off[0], send[0], out_off[0],
                                                         recv[0], axis_name="x")[None]
    out = _per_device(fn, 2, operand, *args)
    np.testing.assert_array_equal(out, [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_emulation_against_a_python_loop_with_several_slices_per_device():
    """4 devices, 2 slices per destination, random sizes: the docstring's SEND / RECEIVE loop in numpy."""
    n, per, rows, out_rows = 4, 2, 10, 24
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 3, (n, n * per))                     # [sender, slice]
    in_off = np.stack([rng.integers(0, rows - 2, n * per) for _ in range(n)])
    out_off = np.zeros_like(sizes)
    for dst in range(n):  # senders' slices for dst laid out one after another at dst
        at = 0
        for src in range(n):
            for i in range(dst * per, dst * per + per):
                out_off[src, i], at = at, at + sizes[src, i]
    recv = np.stack([np.concatenate([sizes[src, me * per:me * per + per] for src in range(n)])
                     for me in range(n)])
    operand = rng.normal(size=(n, rows, 3)).astype(np.float32)
    base = rng.normal(size=(n, out_rows, 3)).astype(np.float32)
    expect = base.copy()
    for src in range(n):
        for i in range(n * per):
            dst = i // per
            expect[dst, out_off[src, i]:out_off[src, i] + sizes[src, i]] = \
                operand[src, in_off[src, i]:in_off[src, i] + sizes[src, i]]

    def fn(op, out, a, b, c, d):
        return token_exchange.emulated_ragged_all_to_all(op[0], out[0], a[0], b[0], c[0], d[0], axis_name="x")[None]
    got = _per_device(fn, n, operand, base, *(jnp.asarray(a, jnp.int32) for a in (in_off, sizes, out_off, recv)))
    np.testing.assert_array_equal(got, expect)


MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.d_model=16", "model.num_heads=2", "model.moe.d_ff=8",
       "mesh.data=2", "mesh.expert=4"]


def _layer(exchange, top_k=2):
    cfg = load_config(overrides=MOE + [f"model.moe.exchange={exchange}", f"model.moe.top_k={top_k}"])
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(MoE(cfg.model, nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (8, 12, 16))

    def loss(state, x):
        y, stats = nnx.merge(graphdef, state)(x)
        return jnp.sum(y * jnp.cos(x)), (y, stats)
    mesh = build_mesh(cfg.mesh, jax.devices())
    with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_rules()):
        (_, (y, stats)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(state, x)
    ids, _, _ = jax.jit(lambda s, x: _route(graphdef, s, x))(state, x)
    return y, g, float(stats["sent_rows"]), np.asarray(ids)


def _route(graphdef, state, x):
    from maxmodel.models.moe import route
    m = nnx.merge(graphdef, state)
    return route(x @ m.router[...], m.moe)


def _routed_elsewhere(ids, n_expert=4, n_data=2, num_experts=4):
    """Token copies whose expert lives on another device of their `expert` group: rows are split over
    (data, expert), 8 rows -> one per device; experts 0-3 over 4 devices."""
    rows_per_device = ids.shape[0] // (n_data * n_expert)
    device = (np.arange(ids.shape[0]) // rows_per_device) % n_expert
    return int(np.sum(ids // (num_experts // n_expert) != device[:, None, None]))


@pytest.mark.parametrize("top_k", [2, 1])
def test_ragged_exchange_equals_padded_and_sends_only_the_routed_rows(top_k):
    """expert=4 × data=2 (the ragged collective emulated on CPU): outputs and weight gradients equal the
    padded exchange's; ragged's sent rows are the copies routed to another device, counted from the router's
    choices, and padded's are (n-1)·N per device whatever the routing."""
    y_pad, g_pad, sent_pad, ids = _layer("padded", top_k)
    y_rag, g_rag, sent_rag, _ = _layer("ragged", top_k)
    np.testing.assert_allclose(y_rag, y_pad, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_rag), jax.tree.leaves(g_pad)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    copies_per_device = 12 * top_k  # one row of 12 tokens per device
    assert sent_pad == 8 * 3 * copies_per_device
    assert sent_rag == _routed_elsewhere(ids)
    assert 0 < sent_rag < sent_pad / 2


def test_ragged_training_equals_padded_training():
    """A whole step (forward, backward through both ragged exchanges, optimizer) on expert=4 × data=2."""
    over = ["model.moe.num_experts=4", "model.moe.top_k=2", "mesh.data=2", "mesh.expert=4"]
    padded = run_steps(over + ["model.moe.exchange=padded"], jax.devices())
    ragged = run_steps(over + ["model.moe.exchange=ragged"], jax.devices())
    np.testing.assert_allclose(ragged, padded, rtol=1e-6)


def test_exchange_choice():
    assert token_exchange.choose("auto", on="tpu") == "ragged"
    assert token_exchange.choose("auto", on="gpu") == "ragged"
    assert token_exchange.choose("auto", on="cpu") == "padded"
    with pytest.raises(ConfigError, match="model.moe.exchange"):
        load_config(overrides=["model.moe.exchange=sparse"])
