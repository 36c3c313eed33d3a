"""`model.moe.impl`: the megablox grouped matmul (Pallas, interpret mode on CPU) against jax.lax.ragged_dot —
the kernel alone, a tiny MoE model's loss and gradients, expert parallelism on 8 devices — the choice per
platform, the config checks, and an ahead-of-time compile for a TPU topology (libtpu)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxmodel.config import ConfigError, load_config
from maxmodel.models.moe import MoE
from maxmodel.parallel import grouped_matmul as gm
from maxmodel.parallel.mesh import build_mesh, check_layout
from maxmodel.parallel.rules import logical_rules

MOE = ["model.moe.num_experts=4", "model.moe.top_k=2"]  # dropless (capacity_factor 0) by default
TOL = dict(rtol=1e-5, atol=1e-5)


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)


@pytest.mark.parametrize("m,k,n,sizes,tiles", [
    (50, 64, 48, (10, 0, 23, 17), (16, 128, 128)),      # 50 rows: padded to 64 (row tile 16); an empty group
    (40, 160, 136, (0, 13, 0, 20, 0), (16, 128, 128)),  # 7 rows past the groups; K, N split with remainders
])
def test_megablox_equals_ragged_dot_values_and_gradients(m, k, n, sizes, tiles):
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (m, k)) / np.sqrt(k)
    w = jax.random.normal(kw, (len(sizes), k, n))
    cotangent = jax.random.normal(kc, (m, n))
    group_sizes = jnp.array(sizes, jnp.int32)

    def run(impl):
        matmul = gm.grouped_matmul(impl, tiles)
        def f(x, w):
            return jnp.sum(matmul(x, w, group_sizes) * cotangent)
        return jax.jit(lambda x, w: (matmul(x, w, group_sizes), jax.grad(f, argnums=(0, 1))(x, w)))(x, w)
    out, (dx, dw) = run("megablox")
    ref, (dx_ref, dw_ref) = run("ragged_dot")
    _close(out, ref)
    _close(dx, dx_ref)
    _close(dw, dw_ref)
    assert not np.any(np.asarray(out)[sum(sizes):]) and not np.any(np.asarray(dx)[sum(sizes):])  # padding: 0
    assert not np.any(np.asarray(dw)[np.asarray(sizes) == 0])                                  # empty groups
    with pytest.raises(AssertionError):  # the comparison sees a wrong grouping
        _close(out, jax.lax.ragged_dot(x, w, jnp.array(sizes[::-1], jnp.int32)))


def _model_loss_and_grads(impl):
    from conftest import TINY

    from maxmodel.models.registry import build_model
    cfg = load_config(overrides=TINY + MOE + [f"model.moe.impl={impl}"])
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(build_model(cfg, nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(3), (2, 32), 0, cfg.model.vocab_size)

    def loss(state):
        logits, stats = nnx.merge(graphdef, state)(tokens, return_stats=True)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], axis=-1).mean()
        return nll + 0.01 * jnp.sum(stats["aux_loss"])
    return jax.jit(jax.value_and_grad(loss))(state)


def test_tiny_moe_model_loss_and_gradients_with_megablox_equal_ragged_dot():
    loss, grads = _model_loss_and_grads("megablox")
    loss_ref, grads_ref = _model_loss_and_grads("ragged_dot")
    _close(loss, loss_ref)
    assert jax.tree.structure(grads) == jax.tree.structure(grads_ref)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        _close(a, b)
    assert float(jnp.abs(grads["layers"]["mlp"]["expert_wi"][...]).max()) > 0  # the experts got gradients


def test_expert_parallel_megablox_equals_one_device():
    """data=2 × expert=2 × tensor=2: every axis manual for the kernel, tokens exchanged over expert, the
    experts' hidden dimension split over tensor and the outputs summed; forward and weight gradients against
    one device with ragged_dot."""
    cfg = load_config(overrides=MOE + ["model.d_model=16", "model.num_heads=2", "model.moe.d_ff=8",
                                       "model.moe.impl=megablox", "mesh.data=2", "mesh.expert=2",
                                       "mesh.tensor=2"])
    ref_cfg = load_config(overrides=MOE + ["model.d_model=16", "model.num_heads=2", "model.moe.d_ff=8",
                                           "model.moe.impl=ragged_dot"])
    x = jax.random.normal(jax.random.key(1), (8, 12, 16))

    def grads(model_cfg):
        with nnx.use_eager_sharding(False):
            graphdef, state = nnx.split(MoE(model_cfg, nnx.Rngs(0)))

        def loss(state, x):
            y, _ = nnx.merge(graphdef, state)(x)
            return jnp.sum(y * jnp.cos(x)), y
        return jax.jit(jax.value_and_grad(loss, has_aux=True, argnums=(0, 1)))(state, x)
    (_, y_ref), g_ref = grads(ref_cfg.model)
    with jax.set_mesh(build_mesh(cfg.mesh, jax.devices())), nnx.logical_axis_rules(logical_rules()):
        (_, y), g = grads(cfg.model)
    _close(y, y_ref)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):  # weights and the input
        _close(a, b)


def test_auto_picks_ragged_dot_on_cpu_and_megablox_on_tpu(monkeypatch):
    assert gm.choose("auto") == "ragged_dot" and gm.choose("megablox") == "megablox"
    assert gm.choose("auto", on="gpu") == "ragged_dot"
    monkeypatch.setattr(gm, "platform", lambda: "tpu")
    assert gm.choose("auto") == "megablox" and gm.choose("ragged_dot") == "ragged_dot"


def test_inside_a_pipeline_stage_auto_is_ragged_dot_and_megablox_is_refused():
    mesh = jax.make_mesh((2,), ("stage",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:2])
    seen = []

    def stage(x):  # traced under the stage's manual axis, as pipeline.py's shard_map does
        seen.append(gm.choose("auto", on="tpu"))
        with pytest.raises(ConfigError, match="model.moe.impl.*pipeline stages"):
            gm.choose("megablox")
        return x
    jax.shard_map(stage, mesh=mesh, in_specs=jax.P("stage"), out_specs=jax.P("stage"))(jnp.zeros(2))
    assert seen == ["ragged_dot"]


@pytest.mark.parametrize("overrides,key,needle", [
    (["model.moe.impl=cutlass"], "model.moe.impl", "not one of auto, ragged_dot, megablox"),
    (["model.moe.impl=megablox", "model.moe.capacity_factor=1.25"], "model.moe.impl", "capacity_factor"),
    (["model.moe.impl=megablox", "train.dtype=float16"], "model.moe.impl", "float16"),
    (["model.moe.tile_rows=100"], "model.moe.tile_rows", "multiple of 16"),
    (["model.moe.tile_mlp=1000"], "model.moe.tile_mlp", "multiple of 128"),
])
def test_bad_choices_name_the_key(overrides, key, needle):
    with pytest.raises(ConfigError, match=key) as e:
        load_config(overrides=MOE + overrides)
    assert needle in str(e.value)
    with pytest.raises(ConfigError, match="model.moe.impl"):
        gm.choose("cutlass")


def test_megablox_in_pipeline_stages_is_refused_by_the_layout_check():
    shape = {"data": 2, "stage": 2, "fsdp": 1, "sequence": 1, "tensor": 1, "expert": 2}
    with pytest.raises(ConfigError, match="model.moe.impl.*pipeline stages"):
        check_layout(load_config(overrides=MOE + ["model.moe.impl=megablox"]), shape)
    check_layout(load_config(overrides=MOE + ["model.moe.impl=auto"]), shape)


def test_megablox_compiles_for_a_tpu_topology():
    """moe-tiny, dropless, with impl=megablox: the train step compiles for v5p-8 (expert=2 × data=2), and at
    the default tiles (512, 1024, 1024) the layer's Mosaic kernels, forward and backward, compile too in
    bfloat16 and float32 (the tiles fit the chip's VMEM), with XLA:TPU's ragged-all-to-all (moe.exchange=auto)."""
    pytest.importorskip("libtpu", reason="libtpu not installed: TPU ahead-of-time compile unavailable")
    from maxmodel.train.aot import compile_for_topology, topology_devices
    cfg = load_config(overrides=["model.name=moe-tiny", "model.moe.impl=megablox", "mesh.data=2",
                                 "mesh.expert=2", "train.batch_size=8", "train.seq_len=128",
                                 "train.dtype=bfloat16", "run.progress=false"])
    report = compile_for_topology(cfg, "v5p-8")
    assert report.devices == 4 and report.fits

    devices, _ = topology_devices("v5p-8", 1)
    layer_cfg = load_config(overrides=["model.d_model=1024", "model.num_heads=8", "model.moe.num_experts=8",
                                       "model.moe.d_ff=2048", "model.moe.impl=auto", "mesh.expert=4"])
    mesh = build_mesh(layer_cfg.mesh, devices)
    for dtype in (jnp.bfloat16, jnp.float32):
        with nnx.use_eager_sharding(False):
            graphdef, state = nnx.split(MoE(layer_cfg.model, nnx.Rngs(0)))

        def loss(state, x):
            return jnp.sum(nnx.merge(graphdef, state)(x)[0].astype(jnp.float32))
        replicated = jax.sharding.NamedSharding(mesh, jax.P())  # the expert shard_map splits them
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=replicated),
                                (state, jax.ShapeDtypeStruct((8, 512, 1024), dtype)))
        with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_rules()):
            compiled = jax.jit(jax.grad(loss)).lower(*abstract).compile()
        # auto chose megablox on the TPU mesh: gmm forward for wi, wg and wo, tgmm for their three weight
        # gradients, and one gmm for the gradient of wo's input (x, the layer input, is not differentiated)
        text = compiled.as_text()
        assert text.count('custom_call_target="tpu_custom_call"') == 7
        # auto chose the ragged exchange too: the tokens there and back, and the transpose of the way back
        assert text.count("ragged-all-to-all-start(") == 3
