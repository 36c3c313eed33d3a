"""MoE layer on one device: dispatch modes against plain loops, capacity bookkeeping, aux losses, counts."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxmodel.config import ConfigError, load_config
from maxmodel.models.moe import (
    MoE,
    capacity,
    capacity_dispatch,
    load_balancing_loss,
    route,
    router_z_loss,
    update_router_bias,
)
from maxmodel.models.params import count_params
from maxmodel.models.transformer import Transformer

BASE = ["model.d_model=16", "model.num_heads=2", "model.d_ff=32", "model.vocab_size=64", "model.num_layers=2",
        "model.init_std=0.3", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.d_ff=8"]


def make_moe(extra=()):
    cfg = load_config(overrides=BASE + list(extra)).model
    with nnx.use_eager_sharding(False):
        return MoE(cfg, nnx.Rngs(1)), cfg


def tokens(b=3, l=10, d=16):
    return jax.random.normal(jax.random.key(2), (b, l, d), jnp.float32)


def expert_mlp(layer, e, x):
    wi, wo = layer.expert_wi[...][e], layer.expert_wo[...][e]
    h = x @ wi
    h = layer.act(x @ layer.expert_wg[...][e]) * h if layer.expert_wg is not None else layer.act(h)
    return h @ wo


def loop_reference(layer, x, keep=None):
    """Gather each expert's tokens, apply it, weight, sum; keep[b, l, j] (capacity) masks dropped copies."""
    ids, weights, _ = route(x @ layer.router[...], layer.moe)
    ids, weights = np.asarray(ids), np.asarray(weights)
    out = np.zeros(x.shape, np.float64)
    for e in range(layer.moe.num_experts):
        b, l, j = np.nonzero((ids == e) & (True if keep is None else keep))
        if len(b):
            y = np.asarray(expert_mlp(layer, e, x[b, l]))
            np.add.at(out, (b, l), y * weights[b, l, j][:, None])
    return out


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_dropless_equals_loop_over_experts(activation):
    layer, _ = make_moe([f"model.activation={activation}"])
    x = tokens()
    y, stats = layer(x)
    ref = loop_reference(layer, x)
    assert np.abs(ref).max() > 0.1  # a non-trivial output
    np.testing.assert_allclose(y, ref, atol=1e-6)
    assert float(stats["dropped"]) == 0.0 and float(jnp.sum(stats["load"])) == pytest.approx(1.0)


def test_shared_experts_add_a_dense_mlp():
    layer, _ = make_moe(["model.moe.shared_experts=2"])
    x = tokens()
    y, _ = layer(x)
    np.testing.assert_allclose(y, loop_reference(layer, x) + np.asarray(layer.shared(x)), atol=1e-6)


def test_capacity_with_room_for_all_equals_dropless():
    dropless, _ = make_moe()
    roomy, _ = make_moe(["model.moe.capacity_factor=4.0"])  # C = L·k: an expert could take every copy
    x = tokens()
    (a, _), (b, stats) = dropless(x), roomy(x)
    assert float(stats["dropped"]) == 0.0
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_capacity_drops_the_hand_computed_copies():
    # E=2, L=3, k=2, factor 0.5 -> C = ceil(3·2/2·0.5) = 2 slots per expert and sequence.
    assert capacity(3, 2, 2, 0.5) == 2
    ids = jnp.array([[[0, 1], [0, 1], [1, 0]]])
    weights = jnp.array([[[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]]])
    # Top-1 choices first: expert 0 <- t0, t1; expert 1 <- t2. Then top-2: expert 1 <- t0 (slot 1), and
    # t1 -> 1 and t2 -> 0 find their expert full: 2 of 6 copies dropped.
    dispatch, combine, dropped = capacity_dispatch(ids, weights, 2, 2)
    assert float(dropped) == pytest.approx(2 / 6)
    expected = np.zeros((1, 3, 2, 2))
    expected[0, 0, 0, 0] = expected[0, 1, 0, 1] = expected[0, 2, 1, 0] = expected[0, 0, 1, 1] = 1
    np.testing.assert_array_equal(dispatch, expected)
    assert float(combine[0, 0, 1, 1]) == pytest.approx(0.4) and float(combine[0, 2, 0].sum()) == 0.0


def test_capacity_layer_equals_loop_without_the_dropped_copies():
    layer, _ = make_moe(["model.moe.capacity_factor=0.5"])
    x = tokens()
    y, stats = layer(x)
    ids = np.asarray(route(x @ layer.router[...], layer.moe)[0])
    cap = capacity(x.shape[1], 4, 2, 0.5)
    keep = np.zeros(ids.shape, bool)
    for b in range(ids.shape[0]):  # GShard priority, written as a plain loop: rank, then token order
        used = [0] * 4
        for j in range(ids.shape[2]):
            for t in range(ids.shape[1]):
                keep[b, t, j] = used[ids[b, t, j]] < cap
                used[ids[b, t, j]] += 1
    assert 0 < 1 - keep.mean() == pytest.approx(float(stats["dropped"]))
    np.testing.assert_allclose(y, loop_reference(layer, x, keep), atol=1e-6)


def test_load_balancing_loss_formula_and_uniform_routing():
    probs = jnp.array([[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    ids = jnp.array([[0], [0], [3], [1]])
    loss, load = load_balancing_loss(ids, probs, 4)
    f = np.array([2, 1, 0, 1]) / 4
    p = np.array([1.45, 0.95, 0.75, 0.85]) / 4
    assert float(loss) == pytest.approx(4 * float(np.sum(f * p)))
    np.testing.assert_allclose(load, f)
    uniform, _ = load_balancing_loss(jnp.array([[0, 1], [2, 3], [1, 0], [3, 2]]), jnp.full((4, 4), 0.25), 4)
    assert float(uniform) == pytest.approx(1.0)
    assert float(router_z_loss(jnp.zeros((5, 4)))) == pytest.approx(math.log(4) ** 2)


def test_aux_losses_enter_the_objective_with_their_weights():
    from maxmodel.finetune import objectives
    from maxmodel.finetune.objectives import LossSettings
    from maxmodel.train.step import _loss_sums
    cfg = load_config(overrides=BASE + ["model.moe.aux_loss_weight=0.5", "model.moe.z_loss_weight=0.25"])
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    toks = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
    batch = {"inputs": toks, "targets": toks, "segment_ids": jnp.ones_like(toks),
             "positions": jnp.broadcast_to(jnp.arange(8), (2, 8)), "loss_mask": jnp.ones((2, 8))}
    total, (nll, count, stats, _) = _loss_sums(objectives.get("causal_lm"), graphdef, (params,), batch,
                                               LossSettings(), moe=cfg.model.moe)
    aux = 0.5 * stats["aux_loss"].sum() + 0.25 * stats["z_loss"].sum()
    assert stats["aux_loss"].shape == (2,) and float(aux) > 0
    assert float(total) == pytest.approx(float(nll + aux * count), rel=1e-6)


@pytest.mark.parametrize("scan", ["true", "false"])
def test_bias_balancing_moves_towards_the_mean_load(scan):
    cfg = load_config(overrides=BASE + ["model.moe.bias_balancing=true", "model.moe.bias_update_rate=0.1",
                                        f"train.scan_layers={scan}"])
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    load = jnp.array([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]])
    model = nnx.merge(graphdef, update_router_bias(graphdef, state, load, 0.1))
    bias = (model.layers.mlp.bias[...] if scan == "true"
            else jnp.stack([model.layers[i].mlp.bias[...] for i in range(2)]))
    np.testing.assert_allclose(bias, [[-0.1, 0.0, 0.0, 0.1], [0.1, 0.1, -0.1, -0.1]])
    # The bias changes the choice of experts, not the weights given to them.
    ids, w, _ = route(jnp.zeros((1, 4)), cfg.model.moe, jnp.array([0.0, 0.0, 1.0, 2.0]))
    assert sorted(np.asarray(ids[0]).tolist()) == [2, 3] and np.allclose(w, 0.5)


def test_mixed_stack_layer_pattern():
    from maxmodel.models.transformer import is_moe_layer
    m = load_config(overrides=BASE + ["model.num_layers=7", "model.moe.first_dense_layers=1",
                                      "model.moe.every=2"]).model
    assert [is_moe_layer(m, i) for i in range(7)] == [False, False, True, False, True, False, True]
    cfg = load_config(overrides=BASE + ["model.num_layers=5", "model.moe.first_dense_layers=1",
                                        "model.moe.every=2"])
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg, nnx.Rngs(0))
    _, stats = model(jnp.zeros((1, 4), jnp.int32), return_stats=True)
    assert stats["load"].shape == (2, 4)  # two MoE layers (2 and 4) of five


def test_published_parameter_counts():
    def counts(name):
        return count_params(load_config(overrides=[f"model.name={name}"]))
    mixtral, deepseek, glam = counts("mixtral-8x7b"), counts("deepseek-moe-16b"), counts("glam-64b-64e")
    assert mixtral["total"] / 1e9 == pytest.approx(46.7, abs=0.05)   # Mistral AI: 46.7B total
    assert mixtral["active"] / 1e9 == pytest.approx(12.9, abs=0.05)  # 12.9B active
    assert deepseek["total"] / 1e9 == pytest.approx(16.4, abs=0.05)  # DeepSeekMoE 16B: 16.4B total
    assert deepseek["active"] / 1e9 == pytest.approx(2.8, abs=0.05)  # 2.8B active
    assert glam["active"] / 1e9 == pytest.approx(96.6, abs=0.05)     # GLaM 64B/64E: 96.6B activated
    tiny = counts("moe-tiny")
    assert tiny["active"] < tiny["total"]


def test_mfu_flops_use_active_parameters():
    from maxmodel.train.metrics import matmul_params
    cfg = load_config(overrides=BASE)
    with nnx.use_eager_sharding(False):
        state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
    experts = 2 * 3 * 4 * 16 * 8  # layers × (wi, wg, wo) × E × d_model × d_ff
    assert matmul_params(state) - matmul_params(state, 2 / 4) == experts // 2


@pytest.mark.parametrize("override, key", [
    ("model.moe.every=3", "model.moe.every"),
    ("model.moe.first_dense_layers=2", "model.moe.first_dense_layers"),
    ("model.moe.top_k=5", "model.moe.top_k"),
    ("model.moe.capacity_factor=-1", "model.moe.capacity_factor"),
])
def test_bad_moe_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=BASE + [override])


def test_layout_check_names_the_expert_axis():
    from maxmodel.parallel.mesh import check_layout
    cfg = load_config(overrides=BASE + ["model.moe.num_experts=6"])
    shape = {"data": 1, "stage": 1, "fsdp": 1, "sequence": 1, "tensor": 1, "expert": 4}
    with pytest.raises(ConfigError, match="model.moe.num_experts"):
        check_layout(cfg, shape)
