"""Expert parallelism on 8 emulated devices equals one device; moe-tiny learns the built-in corpus."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train_step import run_steps

from maxmodel.config import ConfigError, load_config
from maxmodel.models.moe import MoE
from maxmodel.parallel.mesh import build_mesh
from maxmodel.parallel.rules import logical_rules
from maxmodel.train.loop import train

MOE = ["model.moe.num_experts=4", "model.moe.top_k=2"]
LAYOUTS = {
    "expert=4 x data=2": ["mesh.data=2", "mesh.expert=4"],
    "expert=2 x fsdp=2 x tensor=2": ["mesh.data=1", "mesh.expert=2", "mesh.fsdp=2", "mesh.tensor=2"],
}


@pytest.fixture(scope="module")
def single_device():
    return run_steps(MOE + ["mesh.data=1"], jax.devices()[:1])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_expert_parallel_training_equals_single_device(layout, single_device):
    result = run_steps(MOE + LAYOUTS[layout], jax.devices())
    np.testing.assert_allclose(result, single_device, rtol=1e-5)  # [3 steps] × (loss, grad norm)
    assert single_device[-1, 0] < single_device[0, 0]


EVERY_OPTION = ["model.moe.capacity_factor=1.0", "model.moe.shared_experts=1", "model.moe.router=sigmoid",
                "model.moe.bias_balancing=true", "model.moe.every=2", "model.num_layers=8"]
STAGED = {  # MoE layers inside pipeline stages, composed with expert parallelism, under every schedule
    "dropless, gpipe": ([], []),
    "dropless, 1f1b": ([], ["pipeline.schedule=1f1b"]),
    "dropless, zero_bubble": ([], ["pipeline.schedule=zero_bubble"]),
    "capacity, shared, sigmoid, bias balancing, every=2, circular": (EVERY_OPTION, ["pipeline.repeats=2"]),
    "capacity, shared, sigmoid, bias balancing, every=2, interleaved_1f1b": (
        EVERY_OPTION, ["pipeline.repeats=2", "pipeline.schedule=interleaved_1f1b"]),
}
SINGLE_ACCUMULATED = {}


@pytest.mark.parametrize("name", list(STAGED))
def test_moe_in_pipeline_stages_equals_single_device(name):
    """stage=2 x expert=2 x data=2. The pipeline's microbatches are train.microbatches' (rows i, i+M, ...), so
    one device accumulating the same two microbatches is the oracle: routing, capacity and the aux losses
    see the same tokens (1F1B adds the aux losses inside its own objective: pipeline_1f1b.py)."""
    model, pipe = STAGED[name]
    key = tuple(model)
    if key not in SINGLE_ACCUMULATED:
        SINGLE_ACCUMULATED[key] = run_steps(MOE + model + ["mesh.data=1", "train.microbatches=2"],
                                            jax.devices()[:1])
    single = SINGLE_ACCUMULATED[key]
    staged = run_steps(MOE + model + pipe + ["mesh.data=2", "mesh.stage=2", "mesh.expert=2",
                                              "pipeline.microbatches=2"], jax.devices())
    np.testing.assert_allclose(staged, single, rtol=1e-5)


def test_moe_pipeline_limits_name_their_keys():
    from maxmodel.parallel.mesh import check_layout
    shape = {"data": 2, "stage": 2, "fsdp": 1, "sequence": 1, "tensor": 1, "expert": 2}
    for extra, key in ((["model.moe.first_dense_layers=1", "model.num_layers=3"], "model.moe.first_dense_layers"),
                       (["model.moe.every=2", "model.num_layers=4", "pipeline.repeats=2"], "model.num_layers")):
        with pytest.raises(ConfigError, match=key):
            check_layout(load_config(overrides=MOE + extra), shape)


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_layer_and_gradients_under_expert_parallelism(capacity_factor):
    """Both dispatch modes, forward and weight gradients, on expert=4 × data=2 against no mesh at all."""
    cfg = load_config(overrides=MOE + ["model.d_model=16", "model.num_heads=2", "model.moe.d_ff=8",
                                       f"model.moe.capacity_factor={capacity_factor}", "mesh.data=2",
                                       "mesh.expert=4"])
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(MoE(cfg.model, nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (8, 12, 16))

    def loss(state, x):
        y, stats = nnx.merge(graphdef, state)(x)
        return jnp.sum(y * jnp.cos(x)), (y, stats["dropped"])
    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, (y_ref, dropped_ref)), g_ref = grad_fn(state, x)
    mesh = build_mesh(cfg.mesh, jax.devices())
    with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_rules()):
        (_, (y, dropped)), g = grad_fn(state, x)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    assert float(dropped) == pytest.approx(float(dropped_ref))
    assert (float(dropped) > 0) == (capacity_factor == 1.0)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_moe_tiny_learns_with_balanced_load(tmp_path):
    """moe-tiny on the built-in corpus (expert=4 × data=2): the loss falls; the load-balancing loss
    E·Σ f_i·P_i (1 = uniform) stays below 1.4 in every layer at every step.

    (The top-2 choice itself can concentrate for a few steps in this phase: while the model sits on the
    unigram plateau, around steps 5-15, up to 50% of token copies in a layer went to one expert.)"""
    cfg = load_config(overrides=["model.name=moe-tiny", "train.steps=20", "train.seq_len=64", "train.batch_size=8",
                                 "mesh.data=2", "mesh.expert=4", "run.log_every=1", "run.eval_every=1000",
                                 "run.eval_batches=1", "checkpoint.enabled=false", "run.progress=false",
                                 f"run.output_dir={tmp_path}", "optimizer.warmup_steps=5"])
    result = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "default" / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    assert last["loss"] < first["loss"] - 1.0, (first["loss"], last["loss"])  # from ~ln(1024) = 6.9
    for r in records:
        for layer in range(4):
            loads = [r[f"moe/layer{layer}/load/expert{e}"] for e in range(8)]
            assert sum(loads) == pytest.approx(1.0, abs=1e-4) and r[f"moe/layer{layer}/dropped"] == 0.0
            assert 0.9 < r[f"moe/layer{layer}/aux_loss"] < 1.4, (r["step"], layer)
            assert r[f"moe/layer{layer}/z_loss"] > 0
    assert result.stats["flops_per_token"] > 0


EXPERT_LORA = MOE + ["peft.method=lora", "peft.targets=[q,experts]", "peft.rank=4", "optimizer.lr=1e-2",
                     "optimizer.weight_decay=0"]


def test_lora_on_experts_starts_as_the_base_and_merges():
    """Every expert of every MoE layer gets its own A [E, in, r] and B [E, r, out]; B = 0 is exactly the base
    model, and with B moved the merged weights give the adapted logits."""
    from conftest import TINY

    from maxmodel.finetune.peft.lora import merge
    from maxmodel.models.registry import build_model
    base_cfg = load_config(overrides=TINY + MOE)
    cfg = load_config(overrides=TINY + EXPERT_LORA)
    tokens = np.random.default_rng(0).integers(0, 512, (2, 16)).astype(np.int32)
    with nnx.use_eager_sharding(False):
        base, lora = build_model(base_cfg, nnx.Rngs(0)), build_model(cfg, nnx.Rngs(0))
        assert np.array_equal(np.asarray(base(tokens)), np.asarray(lora(tokens)))
        moe = lora.layers.mlp
        assert moe.expert_wi_lora.a[...].shape == (2, 4, 64, 4) and moe.expert_wo_lora.b[...].shape == (2, 4, 4, 64)
        for name in ("expert_wi_lora", "expert_wg_lora", "expert_wo_lora"):
            b = getattr(moe, name).b
            b[...] = 0.05 * jax.random.normal(jax.random.key(len(name)), b[...].shape)
        adapted = np.asarray(lora(tokens))
        assert not np.allclose(adapted, np.asarray(base(tokens)), atol=1e-3)
        np.testing.assert_allclose(np.asarray(merge(lora)(tokens)), adapted, atol=1e-5)


def test_lora_on_experts_trains_on_expert_parallel_layouts_like_one_device():
    one = run_steps(EXPERT_LORA + ["mesh.data=1"], jax.devices()[:1])
    sharded = run_steps(EXPERT_LORA + LAYOUTS["expert=4 x data=2"], jax.devices())
    np.testing.assert_allclose(sharded, one, rtol=1e-5)
    assert one[-1, 0] < one[0, 0]


def test_expert_adapters_are_refused_by_the_peft_export():
    from maxmodel.config import ConfigError
    from maxmodel.finetune.peft.hf_peft import hf_modules
    with pytest.raises(ConfigError, match="peft.targets.*expert_gate.*merged weights"):
        hf_modules(load_config(overrides=EXPERT_LORA))
