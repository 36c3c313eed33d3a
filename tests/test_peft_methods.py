"""Soft prompts, Houlsby adapters, QLoRA and QAT (maxmodel/finetune/peft/{prompt,adapter,qlora}.py,
finetune/qat.py), and the state report every run logs (train/state_bytes.py): each method trains only its own
parameters (the base bitwise unchanged) and lowers the loss; adapters start as the base; the quantized base is
within its stated bound of the float one (checked against a brute-force nearest-level oracle) and 4x / ~8x
smaller; QAT makes int8 inference lose less than plain training does."""
import json
import logging

import jax
import numpy as np
import pytest
from conftest import TINY
from flax import nnx

from maxmodel.cli import main
from maxmodel.config import ConfigError, load_config
from maxmodel.finetune.peft import qlora
from maxmodel.finetune.qat import quantized_copy
from maxmodel.models.registry import build_model
from maxmodel.train.loop import train

BASE = TINY + ["data.source=synthetic", "optimizer.weight_decay=0"]
TOKENS = np.random.default_rng(0).integers(0, 512, (2, 16)).astype(np.int32)
RUNS = {}


def run(tmp_path_factory, name, extra, steps=8):
    """One short training run per method (cached: several tests read the same run), on the built-in text: a
    random base model has nothing a soft prompt could steer on synthetic random tokens."""
    if name not in RUNS:
        out = tmp_path_factory.mktemp(name)
        cfg = load_config(overrides=TINY + ["data.tokenizer=bytes", "optimizer.weight_decay=0"] + extra + [
                                                    f"run.output_dir={out}", f"train.steps={steps}",
                                                    "run.log_every=1", "run.eval_every=1000",
                                                    "checkpoint.enabled=false"])
        result = train(cfg)
        RUNS[name] = cfg, result, jax.device_get(result.params)
    return RUNS[name]


def initial(cfg):
    with nnx.use_eager_sharding(False):
        return nnx.split(build_model(cfg, nnx.Rngs(cfg.train.seed)))[1]


def model_of(cfg, params):
    with nnx.use_eager_sharding(False):
        return nnx.merge(nnx.split(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))))[0],
                         jax.tree.map(np.array, params))


def assert_only_own_params_changed(cfg, params, n_own):
    own, frozen = nnx.split_state(params, nnx.LoRAParam, ...)
    own0, frozen0 = nnx.split_state(initial(cfg), nnx.LoRAParam, ...)
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen0), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(own0), strict=True)]
    assert len(changed) == n_own and all(changed)


PROMPT = ["peft.method=prompt", "peft.num_virtual_tokens=4", "optimizer.lr=5e-2"]
ADAPTER = ["peft.method=adapter", "peft.adapter_dim=8", "optimizer.lr=2e-2"]


def test_soft_prompt_trains_only_its_table_and_lowers_the_loss(tmp_path_factory):
    cfg, result, params = run(tmp_path_factory, "prompt", PROMPT)
    losses = list(result.losses.values())
    assert losses[-1] < losses[0]
    assert_only_own_params_changed(cfg, params, 1)
    assert params["soft_prompt"]["table"].shape == (1, 4, 64)


def test_soft_prompts_of_different_tasks_share_a_batch():
    cfg = load_config(overrides=BASE + PROMPT + ["peft.num_prompts=3"])
    with nnx.use_eager_sharding(False):
        model = build_model(cfg, nnx.Rngs(0))
    mixed = np.asarray(model(TOKENS, task=np.array([2, 0])))
    alone = [np.asarray(model(TOKENS[i:i + 1], task=np.array([t]))) for i, t in ((0, 2), (1, 0))]
    np.testing.assert_allclose(mixed, np.concatenate(alone), atol=1e-5)
    swapped = np.asarray(model(TOKENS, task=np.array([0, 2])))
    assert np.abs(swapped[0] - mixed[0]).max() > 1e-3  # the table a row picks matters


@pytest.mark.parametrize("packing", ["first_fit", "none", "concat"])
def test_packed_rows_lead_pieces_with_prompt_slots(packing):
    """first_fit / none: every document piece (continuations too) starts with its own k slots; concat: every
    row starts with k slots in its first segment. Slots are never targets; the tokens keep their order."""
    from maxmodel.data.packing import make_rows
    from maxmodel.data.store import MemoryStore, default_weights
    docs = [np.arange(100 * (i + 1), 100 * (i + 1) + n, dtype=np.int32) for i, n in enumerate((5, 7, 20, 6))]
    rows = make_rows(MemoryStore([(d, default_weights(len(d))) for d in docs]), 16, 0, packing, virtual=3, task=2)
    pieces, stream = 0, []
    for r in (rows[i] for i in range(len(rows))):
        assert len(r["inputs"]) == 16 and (r["task"] == 2).all()
        for seg in sorted(set(r["segment_ids"].tolist()) - {0}):
            at = np.flatnonzero(r["segment_ids"] == seg)
            slots, loss = r["prompt_slots"][at], r["loss_mask"][at]
            led = packing != "concat" or seg == r["segment_ids"][0]
            if led:
                np.testing.assert_array_equal(slots[:3], [1, 2, 3])
            assert (slots[3 if led else 0:] == 0).all() and (loss[slots > 0] == 0).all()
            assert (r["positions"][at] == np.arange(len(at))).all()
            stream.append(r["inputs"][at][slots == 0])
            pieces += 1
    if packing != "concat":  # the long document was cut, and its continuation led too
        assert pieces > len(docs)
        got = np.concatenate(stream)
        assert set(got.tolist()) <= set(np.concatenate(docs).tolist()) and len(got) >= sum(map(len, docs)) - pieces


def test_placed_prompts_condition_each_packed_document_like_a_prepended_one():
    """Two documents of different tasks packed in one row, each led by its slots, get the logits each gets
    alone with its prompt prepended (prompt.py's two ways in)."""
    cfg = load_config(overrides=BASE + PROMPT + ["peft.num_prompts=3"])
    with nnx.use_eager_sharding(False):
        model = build_model(cfg, nnx.Rngs(0))
    k, a, b = 4, TOKENS[0, :6], TOKENS[1, :5]
    tokens = np.concatenate([np.zeros(k, np.int32), a, np.zeros(k, np.int32), b])[None]
    seg = np.repeat([1, 2], [k + len(a), k + len(b)])[None]
    pos = np.concatenate([np.arange(k + len(a)), np.arange(k + len(b))])[None]
    slots = np.concatenate([np.arange(1, k + 1), np.zeros(len(a), int), np.arange(1, k + 1),
                            np.zeros(len(b), int)])[None]
    task = np.repeat([2, 1], [k + len(a), k + len(b)])[None]
    packed = np.asarray(model(tokens, seg, pos, task=task, prompt_slots=slots))[0]
    np.testing.assert_allclose(packed[k:k + len(a)], np.asarray(model(a[None], task=np.array([2])))[0], atol=1e-5)
    np.testing.assert_allclose(packed[2 * k + len(a):], np.asarray(model(b[None], task=np.array([1])))[0],
                               atol=1e-5)


def test_mixture_components_train_their_own_soft_prompts(tmp_path_factory):
    mix = "data.mixture={a: {source: builtin, task: 0}, b: {source: builtin, task: 1}}"
    cfg, result, params = run(tmp_path_factory, "prompt-mix", PROMPT + ["peft.num_prompts=2", "data.source=mixture",
                                                                       mix, "data.packing=first_fit"])
    losses = list(result.losses.values())
    assert losses[-1] < losses[0]
    table, table0 = np.asarray(params["soft_prompt"]["table"]), np.asarray(initial(cfg)["soft_prompt"]["table"])
    assert all(not np.allclose(table[t], table0[t]) for t in (0, 1))  # each component's rows trained its own
    with pytest.raises(ConfigError, match=r"data.mixture.b.task"):
        train(load_config(overrides=TINY + PROMPT + ["data.source=mixture", mix.replace("task: 1", "task: 2")]))


def test_adapters_start_as_the_base_train_only_themselves_and_lower_the_loss(tmp_path_factory):
    with nnx.use_eager_sharding(False):
        base = build_model(load_config(overrides=BASE), nnx.Rngs(0))
        adapted = build_model(load_config(overrides=BASE + ADAPTER), nnx.Rngs(0))
    assert np.array_equal(np.asarray(base(TOKENS)), np.asarray(adapted(TOKENS)))
    cfg, result, params = run(tmp_path_factory, "adapter", ADAPTER)
    losses = list(result.losses.values())
    assert losses[-1] < losses[0]
    assert_only_own_params_changed(cfg, params, 2 * 4)  # attn and mlp bottlenecks: down, bias, up, bias


def nf4_oracle(w, block):
    """Brute force along the last axis: each weight to the nearest NF4 level times its block's absmax."""
    blocks = w.reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    normed = blocks / absmax
    levels = qlora.NF4[np.argmin(np.abs(normed[..., None] - qlora.NF4), axis=-1)]
    return (levels * absmax).reshape(w.shape)


def test_nf4_levels_are_the_normal_quantiles_of_qlora():
    from scipy.stats import norm  # QLoRA's create_normal_map(offset=0.9677), independently of the table
    off = 0.9677083
    pos = norm.ppf(np.linspace(off, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(off, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    np.testing.assert_allclose(v / v.max(), qlora.NF4, atol=1e-6)


def test_dequantized_base_is_within_the_stated_error():
    w = np.random.default_rng(1).normal(0, 0.02, (64, 4, 16)).astype(np.float32)
    codes, scales = qlora.nf4_quantize(w, 32, 0)
    back = np.asarray(qlora.nf4_dequantize(codes, scales, 0))
    np.testing.assert_allclose(back, np.moveaxis(nf4_oracle(np.moveaxis(w, 0, -1), 32), -1, 0), atol=1e-7)
    absmax = np.moveaxis(np.abs(np.moveaxis(w, 0, -1)).reshape(4, 16, 2, 32).max(-1), -1, 0).repeat(32, axis=0)
    assert np.all(np.abs(back - w) <= qlora.NF4_MAX_ERROR * absmax + 1e-7)  # stated: 0.1385 x block absmax
    assert codes.dtype == np.uint8 and codes.shape == (32, 4, 16) and scales.shape == (2, 4, 16)
    q, s = qlora.int8_quantize(w, 1)
    err = np.abs(np.asarray(q, np.float32) * np.asarray(s) - w)
    assert np.all(err <= np.abs(w).max(axis=0, keepdims=True) / 254 + 1e-8)  # stated: channel absmax / 254


# nf4 at block 64: 0.5 byte per weight + a float32 scale per 64 = 7.1x (scales are not double-quantized)
@pytest.mark.parametrize("quant,ratio", [("nf4", 7.0), ("int8", 3.7)])
def test_quantized_base_is_smaller_and_close_to_the_float_one(quant, ratio):
    extra = ["peft.method=qlora", "peft.targets=all", f"peft.quant={quant}", "peft.block_size=64"]
    float_state, q_state = initial(load_config(overrides=BASE)), initial(load_config(overrides=BASE + extra))

    def nbytes(state, group, attr):
        return sum(x.nbytes for x in jax.tree.leaves(state["layers"][group][attr]))
    weights = [("attn", a) for a in ("wq", "wk", "wv", "wo")] + [("mlp", a) for a in ("wg", "wi", "wo")]
    before = sum(nbytes(float_state, g, a) for g, a in weights)
    after = sum(nbytes(q_state, g, a) for g, a in weights)
    assert before / after > ratio
    cfg = load_config(overrides=BASE + extra)
    with nnx.use_eager_sharding(False):
        base = np.asarray(build_model(load_config(overrides=BASE), nnx.Rngs(0))(TOKENS))
        quant_logits = np.asarray(build_model(cfg, nnx.Rngs(0))(TOKENS))
    assert 0 < np.abs(quant_logits - base).max() < (0.2 if quant == "nf4" else 0.02)


def test_qlora_short_run_lowers_the_loss_and_keeps_the_codes(tmp_path_factory):
    cfg, result, params = run(tmp_path_factory, "qlora", ["peft.method=qlora", "peft.targets=all", "peft.rank=4",
                                                          "peft.alpha=8", "optimizer.lr=2e-2", "peft.block_size=32"])
    losses = list(result.losses.values())
    assert losses[-1] < losses[0]
    assert_only_own_params_changed(cfg, params, 2 * 7)
    assert params["layers"]["attn"]["wq"]["codes"].dtype == np.uint8


def test_qlora_block_size_that_fits_nothing_names_the_key():
    cfg = load_config(overrides=BASE + ["peft.method=qlora", "peft.block_size=48"])
    with pytest.raises(ConfigError, match="peft.block_size"), nnx.use_eager_sharding(False):
        build_model(cfg, nnx.Rngs(0))


def test_qat_makes_int8_inference_lose_less(tmp_path_factory):
    gaps = {}
    for name, extra in (("plain", []), ("qat", ["train.qat=int8"])):
        cfg, _, params = run(tmp_path_factory, "qat-" + name, extra + ["optimizer.lr=1e-2"], steps=30)
        plain_cfg = load_config(overrides=BASE)  # the same weights served without fake quantization
        float_logits = np.asarray(model_of(plain_cfg, params)(TOKENS))
        int8_logits = np.asarray(quantized_copy(model_of(plain_cfg, params), 8)(TOKENS))
        gaps[name] = np.abs(int8_logits - float_logits).mean()
    assert gaps["qat"] < gaps["plain"], gaps


def test_every_run_logs_its_trainable_share_and_state_bytes(tmp_path_factory, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="maxmodel.train"):
        RUNS.pop("adapter-log", None)
        cfg, result, _ = run(tmp_path_factory, "adapter-log", ADAPTER, steps=1)
    s = result.stats["state"]
    own = nnx.split_state(initial(cfg), nnx.LoRAParam, ...)[0]
    n_own = sum(x.size for x in jax.tree.leaves(own))
    total = sum(x.size for x in jax.tree.leaves(initial(cfg)))
    assert s["trainable_params"] == n_own and s["total_params"] == total
    assert s["grad_bytes"] == 4 * n_own and 8 * n_own <= s["opt_state_bytes"] < 8 * n_own + 1024  # adamw
    assert f"trainable params {n_own:,} of {total:,}" in caplog.text
    assert main(["config", "show", "--json", *BASE, *ADAPTER]) == 0
    assert json.loads(capsys.readouterr().out)["state"]["trainable_params"] == n_own


@pytest.mark.parametrize("name", ["lora", "qlora", "prompt", "adapter", "qat"])
def test_every_example_config_validates_and_shows_its_state(name, capsys):
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "configs" / "finetune" / f"{name}.yaml"
    assert main(["config", "show", "--json", str(path), "model.name=tiny"]) == 0
    out = json.loads(capsys.readouterr().out)
    state = out["state"]
    assert 0 < state["trainable_params"] <= state["total_params"]
    if name != "qat":  # full fine-tuning with fake quantization trains everything
        assert state["trainable_params"] < 0.2 * state["total_params"]  # of stored elements (nf4: 2 per byte)


def test_peft_runs_start_from_an_exported_base(tmp_path):
    """init.from with a peft method: the exported float base under fresh adapters (lora), or quantized (qlora)."""
    common = BASE + [f"run.output_dir={tmp_path}", "run.eval_every=1000", "run.log_every=1"]
    src = train(load_config(overrides=common + ["run.name=src", "train.steps=2", "checkpoint.every_steps=2"]))
    assert main(["export", "--run-dir", str(src.run_dir), "--out", str(tmp_path / "base")]) == 0
    base = jax.device_get(src.params)
    for name, extra in (("lora", ["peft.method=lora"]), ("qlora", ["peft.method=qlora", "peft.quant=nf4"])):
        new = train(load_config(overrides=common + extra + [f"run.name={name}", f"init.from={tmp_path / 'base'}",
                                                            "train.steps=1", "checkpoint.enabled=false"]))
        params = jax.device_get(new.params)
        np.testing.assert_array_equal(params["embed"]["table"], base["embed"]["table"])
        if name == "lora":
            np.testing.assert_array_equal(params["layers"]["mlp"]["wo"], base["layers"]["mlp"]["wo"])
        else:
            codes, scales = qlora.nf4_quantize(base["layers"]["attn"]["wq"], 64, 1)  # [layers, 64, ...]: d_model
            np.testing.assert_array_equal(params["layers"]["attn"]["wq"]["codes"], np.asarray(codes))
            np.testing.assert_array_equal(params["layers"]["attn"]["wq"]["scales"], np.asarray(scales))


def test_qlora_merges_and_exports_float_weights(tmp_path_factory, tmp_path):
    from maxmodel.finetune.peft.lora import merge
    cfg, _, params = run(tmp_path_factory, "qlora", ["peft.method=qlora", "peft.targets=all", "peft.rank=4",
                                                     "peft.alpha=8", "optimizer.lr=2e-2", "peft.block_size=32"])
    unmerged = np.asarray(model_of(cfg, params)(TOKENS))
    merged_model = merge(model_of(cfg, params))
    np.testing.assert_allclose(np.asarray(merged_model(TOKENS)), unmerged, atol=1e-5)
    assert nnx.state(merged_model)["layers"]["attn"]["wq"][...].dtype == np.float32
