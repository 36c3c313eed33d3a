"""LoRA (maxmodel/finetune/peft/lora.py): B = 0 is exactly the base model; training changes the adapters only
(base bitwise unchanged, optimizer state for adapters alone) and lowers the loss; merged and unmerged logits
agree; `maxmodel export` writes merged weights and, with --format peft, an adapter that Hugging Face peft
loads onto the transformers model with maxmodel's logits (float32, out of process)."""
import json

import hf_oracle
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import TINY
from flax import nnx

from maxmodel.cli import main
from maxmodel.config import ConfigError, load_config
from maxmodel.config.schema import to_dict
from maxmodel.finetune.peft.lora import DropoutSeed, merge
from maxmodel.models.registry import build_model
from maxmodel.parallel.mesh import build_mesh
from maxmodel.parallel.rules import logical_rules
from maxmodel.train.checkpoint import abstract_like
from maxmodel.train.export import load_params
from maxmodel.train.loop import train
from maxmodel.train.step import abstract_state, build_train_step, concrete_shardings

BASE = TINY + ["data.source=synthetic"]
LORA = ["peft.method=lora", "peft.targets=all", "peft.rank=4", "peft.alpha=8", "optimizer.lr=2e-2",
        "optimizer.weight_decay=0"]
TOKENS = np.random.default_rng(0).integers(0, 512, (2, 16)).astype(np.int32)


def model_of(cfg, params):
    """A model on the host over a copy of `params` (merge() folds adapters in place: never into the fixture's)."""
    with nnx.use_eager_sharding(False):  # outside any mesh
        return nnx.merge(abstract_state(cfg)[0], jax.tree.map(np.array, params))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    # with LoRA dropout: training draws masks, while merging, exporting and PEFT's logits see none
    cfg = load_config(overrides=TINY + LORA + ["peft.dropout=0.1", "data.tokenizer=bytes", f"run.output_dir={out}",
                                               "train.steps=8",
                                               "run.log_every=1",
                                               "run.eval_every=1000", "checkpoint.every_steps=8"])
    result = train(cfg)
    return cfg, result, jax.device_get(result.params)


def test_zero_b_is_exactly_the_base_model():
    base_cfg, cfg = load_config(overrides=BASE), load_config(overrides=BASE + LORA)
    with nnx.use_eager_sharding(False):
        base, lora = build_model(base_cfg, nnx.Rngs(0)), build_model(cfg, nnx.Rngs(0))
    assert np.array_equal(np.asarray(base(TOKENS)), np.asarray(lora(TOKENS)))


def test_training_changes_only_the_adapters(trained):
    cfg, result, params = trained
    losses = list(result.losses.values())
    assert losses[-1] < losses[0]
    adapters, frozen = nnx.split_state(params, nnx.LoRAParam, ...)
    with nnx.use_eager_sharding(False):
        _, initial = nnx.split(build_model(cfg, nnx.Rngs(cfg.train.seed)))
    init_adapters, init_frozen = nnx.split_state(initial, nnx.LoRAParam, ...)
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(init_frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(init_adapters))]
    assert all(changed) and len(changed) == 2 * 7  # A and B of q k v o gate up down (layers stacked)


def test_optimizer_state_exists_only_for_adapters():
    cfg = load_config(overrides=BASE + LORA)
    mesh = build_mesh(cfg.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_rules(cfg.mesh.rules, cfg.mesh.rule_overrides)):
        graphdef, abstract = abstract_state(cfg)
        ts = build_train_step(cfg, graphdef, abstract, mesh)
    adapters, frozen = nnx.split_state(abstract, nnx.LoRAParam, ...)
    adapter_size = sum(x.size for x in jax.tree.leaves(adapters))
    moments = [x for x in jax.tree.leaves(ts.abstract_opt) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * adapter_size  # AdamW's two moments, of the adapters alone
    assert adapter_size < 0.2 * sum(x.size for x in jax.tree.leaves(frozen))


def test_merged_equals_unmerged(trained):
    cfg, _, params = trained
    unmerged = np.asarray(model_of(cfg, params)(TOKENS))
    merged = np.asarray(merge(model_of(cfg, params))(TOKENS))
    np.testing.assert_allclose(merged, unmerged, atol=1e-5)


def test_export_merged_and_peft_loaded_by_transformers(trained, tmp_path):
    cfg, result, params = trained
    ours = np.asarray(model_of(cfg, params)(TOKENS))
    run_dir = str(result.run_dir)
    assert main(["export", "--run-dir", run_dir, "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", "--run-dir", run_dir, "--format", "peft", "--out", str(tmp_path / "adapter")]) == 0
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["r"] == 4 and set(conf["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"}
    # the merged model directory is a plain model: init.from / plain forward give the adapted logits
    base_cfg = load_config(overrides=BASE)
    mesh = build_mesh(base_cfg.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_rules(base_cfg.mesh.rules, {})):
        _, abstract = abstract_state(base_cfg)
        merged = load_params(str(tmp_path / "merged"), abstract_like(abstract, concrete_shardings(abstract, mesh)))
    merged_logits = np.asarray(model_of(base_cfg, jax.device_get(merged))(TOKENS))
    np.testing.assert_allclose(merged_logits, ours, atol=1e-5)
    # the frozen base as a model directory, converted to transformers; peft adds the exported adapter
    frozen = nnx.split_state(params, nnx.Any(nnx.LoRAParam, DropoutSeed), ...)[1]  # the base alone
    base_dir = tmp_path / "base"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((base_dir / "params").absolute(), frozen)
    (base_dir / "export.json").write_text(json.dumps({"step": 0, "model": to_dict(cfg.model)}))
    assert main(["convert", "to-hf", str(base_dir), "--out", str(tmp_path / "hf")]) == 0
    hf_oracle.require()
    np.save(tmp_path / "tokens.npy", TOKENS)
    info = hf_oracle.run("peft", json.dumps({"base": str(tmp_path / "hf"), "adapter": str(tmp_path / "adapter"),
                                             "tokens": str(tmp_path / "tokens.npy"),
                                             "logits": str(tmp_path / "hf_logits.npy")}))
    assert info["class"] == "LlamaForCausalLM" and info["lora_modules"] == 7 * cfg.model.num_layers
    np.testing.assert_allclose(np.load(tmp_path / "hf_logits.npy"), ours, atol=1e-4, rtol=1e-4)
    assert np.abs(ours - np.asarray(model_of(load_config(overrides=BASE), frozen)(TOKENS))).max() > 1e-3


def test_peft_adapter_round_trip_and_misfit(trained, tmp_path):
    from maxmodel.finetune.peft.hf_peft import load_peft, save_peft
    cfg, _, params = trained
    pure = params.to_pure_dict()
    save_peft(cfg, pure, tmp_path / "a")
    zeroed = jax.tree.map(lambda x: np.zeros_like(x), pure)
    back = load_peft(cfg, zeroed, tmp_path / "a")
    lora = pure["layers"]["attn"]["wq_lora"]
    np.testing.assert_array_equal(back["layers"]["attn"]["wq_lora"]["a"], lora["a"])
    np.testing.assert_array_equal(back["layers"]["mlp"]["wo_lora"]["b"], pure["layers"]["mlp"]["wo_lora"]["b"])
    other = load_config(overrides=BASE + LORA + ["peft.rank=8"])
    with pytest.raises(ConfigError, match="peft.adapter.*r=4 but peft"):
        load_peft(other, zeroed, tmp_path / "a")


def test_targets_matching_nothing_name_the_key():
    with pytest.raises(ConfigError, match="peft.targets"):
        load_config(overrides=BASE + LORA + ["peft.targets=[qq]"])
    cfg = load_config(overrides=BASE + LORA + ["model.name=bert-tiny", "peft.targets=[gate]",
                                               "train.objective=masked_lm"])
    with pytest.raises(ConfigError, match="peft.targets.*match no weight"), nnx.use_eager_sharding(False):
        build_model(cfg, nnx.Rngs(0))


def test_dropout_acts_in_training_only_with_a_key_per_layer_and_step():
    """peft.dropout: nnx.Dropout on each adapter's input, off unless the train step's model.train() turns it
    on; its seeds differ per layer of the scanned stack and per target, and the step folds its numbers in."""
    from maxmodel.finetune.peft.lora import Adapter, DropoutSeed, for_step
    cfg = load_config(overrides=BASE + LORA + ["peft.dropout=0.5"])
    with nnx.use_eager_sharding(False):
        model = build_model(cfg, nnx.Rngs(0))
        plain = build_model(load_config(overrides=BASE + LORA), nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for m in (model, plain):  # the same nonzero B in both, so the adapters matter
        for adapter in (mod for _, mod in nnx.iter_modules(m) if isinstance(mod, Adapter)):
            adapter.b[...] = rng.standard_normal(adapter.b.shape).astype(np.float32) * 0.1
        rng = np.random.default_rng(1)
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), np.asarray(plain(TOKENS)))  # inference: no dropout
    graphdef, state = nnx.split(model)
    seeds = jax.tree.leaves(nnx.split_state(state, DropoutSeed, ...)[0])
    assert len(seeds) == 7 and seeds[0].shape[0] == cfg.model.num_layers
    flat = np.concatenate([np.asarray(s).reshape(-1, s.shape[-1]) for s in seeds])
    assert len({tuple(k) for k in flat}) == len(flat)  # every layer and target draws its own mask

    def train_logits(*numbers):
        m = nnx.merge(graphdef, for_step(state, *numbers))
        m.train()
        return np.asarray(m(TOKENS))
    a, again, other = train_logits(3), train_logits(3), train_logits(4)
    np.testing.assert_array_equal(a, again)  # deterministic given the step
    assert not np.allclose(a, other) and not np.allclose(a, np.asarray(plain(TOKENS)))


def test_dropout_out_of_range_or_on_folded_expert_adapters_names_the_key():
    with pytest.raises(ConfigError, match="peft.dropout"):
        load_config(overrides=BASE + LORA + ["peft.dropout=1.0"])
    with pytest.raises(ConfigError, match="peft.dropout.*folded"):
        load_config(overrides=BASE + LORA + ["peft.dropout=0.1", "peft.targets=[q,experts]",
                                             "model.moe.num_experts=4"])
