"""Hugging Face interop: tiny random transformers models (built from configs, nothing downloaded) converted to
maxmodel give the same logits (float32, max abs diff < 1e-4), and convert back to identical tensors.

The transformers side runs out of process (tests/hf_oracle.py, with .venv-hf's Python): it builds and saves
the model and computes its logits, and later loads the converted-back directory and compares every tensor."""
from __future__ import annotations

import json
from pathlib import Path

import hf_oracle
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxmodel.config import load_config
from maxmodel.config.errors import ConfigError
from maxmodel.config.loader import config_from_dict
from maxmodel.interop import convert, hf_config
from maxmodel.interop.orbax_stream import open_lazy, read
from maxmodel.interop.safetensors_io import Reader
from maxmodel.parallel.mesh import build_mesh
from maxmodel.parallel.rules import logical_rules
from maxmodel.train.checkpoint import abstract_like
from maxmodel.train.export import load_params
from maxmodel.train.step import abstract_state, concrete_shardings

SMALL = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
             "max_position_embeddings": 64}
CASES = {
    "gpt2": ("GPT2Config", {"vocab_size": 97, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
                                  "bos_token_id": 0, "eos_token_id": 0}),
    "llama_gqa": ("LlamaConfig", dict(SMALL, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama3_rope_scaling": ("LlamaConfig", dict(SMALL, num_key_value_heads=2, max_position_embeddings=128,
                                                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                                 "factor": 8.0, "low_freq_factor": 1.0,
                                                                 "high_freq_factor": 4.0,
                                                                 "original_max_position_embeddings": 16})),
    "mistral_sliding_window": ("MistralConfig", dict(SMALL, num_key_value_heads=2, sliding_window=5)),
    "gemma2": ("Gemma2Config", dict(SMALL, num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
                                    sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=3.0)),
    "qwen2": ("Qwen2Config", dict(SMALL, num_key_value_heads=2, tie_word_embeddings=True)),
    # saved in the Hub layout (block_sparse_moe.experts.J.w1/w2/w3), which save_pretrained writes by default
    "mixtral": ("MixtralConfig", dict(SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    # transformers 5's fused experts (mlp.experts.gate_up_proj / down_proj) and a sliding window
    "mixtral_fused": ("MixtralConfig", dict(SMALL, num_key_value_heads=2, num_local_experts=3,
                                            num_experts_per_tok=2, sliding_window=5)),
    "bert": ("BertConfig", dict(SMALL, type_vocab_size=2)),
    # what the Hub's BERT checkpoints hold: BertForMaskedLM's tensors plus the pooler and the next-sentence head
    "bert_pretraining": ("BertConfig", dict(SMALL, type_vocab_size=2)),
}
AUTO = {"bert": "AutoModelForMaskedLM", "bert_pretraining": "AutoModelForPreTraining"}  # else ...ForCausalLM
UNSCANNED = ("llama_gqa", "mixtral_fused", "bert")  # these go through the one-subtree-per-layer layout
SEQ = 24  # longer than the sliding windows, so local and global layers differ


def _our_logits(init: Path, tokens: np.ndarray, scan: bool) -> np.ndarray:
    info = json.loads((init / "export.json").read_text())
    cfg = config_from_dict({"model": info["model"], "train": {**convert.train_section(info["model"], scan), "seq_len": SEQ}})
    mesh = build_mesh(cfg.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_rules("default")):
        graphdef, abstract = abstract_state(cfg)
        params = load_params(str(init), abstract_like(abstract, concrete_shardings(abstract, mesh)))
        return np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens)))


@pytest.mark.parametrize("kind", list(CASES))
def test_logit_parity_and_round_trip(kind, tmp_path, caplog):
    hf_oracle.require()
    hf_dir, init, back = tmp_path / "hf", tmp_path / "init", tmp_path / "back"
    tokens = np.random.default_rng(1).integers(0, 97, size=(2, SEQ))
    np.save(tmp_path / "tokens.npy", tokens)
    cls_name, kwargs = CASES[kind]
    built = hf_oracle.run("build", json.dumps({
        "config": cls_name, "auto": AUTO.get(kind, "AutoModelForCausalLM"), "kwargs": kwargs, "dir": str(hf_dir),
        "seed": 0, "std": 0.3,
        "max_shard_size": "20KB", "original_format": kind != "mixtral_fused",  # several shards + index
        "tokens": str(tmp_path / "tokens.npy"), "logits": str(tmp_path / "logits.npy")}))
    assert (hf_dir / "model.safetensors.index.json").is_file(), built["files"]
    weight_map = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    if kind.startswith("mixtral"):  # the case really holds the layout it is named for
        fused = "model.layers.0.mlp.experts.gate_up_proj" in weight_map
        assert fused == (kind == "mixtral_fused"), sorted(weight_map)
    expected = np.load(tmp_path / "logits.npy")

    scan = kind not in UNSCANNED
    with caplog.at_level("WARNING", logger="maxmodel.convert"):
        convert.from_hf(str(hf_dir), str(init), scan_layers=scan)
    left_out = "no place for them: cls.seq_relationship.bias, cls.seq_relationship.weight (2 of"
    assert (left_out in caplog.text) == (kind == "bert_pretraining"), caplog.text  # else every tensor is used
    run_cfg = load_config(str(init / "config.yaml"), [f"init.from={init}"])  # what fine-tuning it starts from
    assert run_cfg.train.objective == ("masked_lm" if kind.startswith("bert") else "causal_lm")
    ours = _our_logits(init, tokens, scan)
    assert ours.shape == expected.shape
    diff = float(np.max(np.abs(ours - expected)))
    assert diff < 1e-4, f"{kind}: max abs logit difference {diff}"

    convert.to_hf(str(init), str(back), max_shard_bytes=30_000)
    report = hf_oracle.run("load", str(back), str(hf_dir))
    assert report["original_class"] == built["class"]
    assert report["loading"] == {}, report["loading"]  # no missing, unexpected or mismatched tensors
    assert report["different"] == [], report["different"]
    assert report["only_loaded"] == [] and report["compared"] > 0
    if kind == "bert_pretraining":  # written back as BertForMaskedLM: without the pooler and NSP head
        assert report["class"] == "BertForMaskedLM"
        assert report["only_original"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                                           "cls.seq_relationship.bias", "cls.seq_relationship.weight"]
        pooler = read(open_lazy(init / "params")["pooler"]["value"])
        np.testing.assert_array_equal(pooler.T, Reader(hf_dir).get("bert.pooler.dense.weight"))
    else:
        assert report["class"] == built["class"] and report["only_original"] == []


def test_mixtral_config_both_ways():
    """Mixtral 8x7B's published config.json values from configs/models/mixtral-8x7b.yaml, and back; what
    Mixtral cannot hold is an error naming the key."""
    model = load_config(None, ["model.name=mixtral-8x7b"]).model
    assert hf_config.guess_family(model) == "mixtral"
    hf = hf_config.to_hf(model, "mixtral")
    assert (hf["num_local_experts"], hf["num_experts_per_tok"], hf["intermediate_size"]) == (8, 2, 14336)
    assert hf["sliding_window"] is None and hf["architectures"] == ["MixtralForCausalLM"]
    assert hf["router_aux_loss_coef"] == pytest.approx(0.02)  # the released config.json's
    back, family = hf_config.from_hf(hf)
    assert family == "mixtral" and back.moe.num_experts == 8 and back.moe.top_k == 2 and back.moe.d_ff == 14336
    assert back.moe.capacity_factor == 0 and back.moe.router == "softmax" and back.moe.renormalize
    assert back.moe.aux_loss_weight == pytest.approx(model.moe.aux_loss_weight) and back.moe.z_loss_weight == 0
    for override, key in [("model.moe.router=sigmoid", "model.moe.router"),
                          ("model.moe.shared_experts=1", "model.moe.shared_experts"),
                          ("model.activation=geglu", "model.activation")]:
        bad = load_config(None, ["model.name=moe-tiny", override]).model
        with pytest.raises(ConfigError, match=key):
            hf_config.to_hf(bad, "mixtral")


def test_bert_config_both_ways():
    """bert-base.yaml as config.json (the values of the released bert-base-uncased) and back; what BERT cannot
    hold is an error naming the key."""
    model = load_config(None, ["model.name=bert-base"]).model
    assert hf_config.guess_family(model) == "bert"
    hf = hf_config.to_hf(model, "bert")
    assert hf["architectures"] == ["BertForMaskedLM"] and hf["hidden_act"] == "gelu"
    assert (hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], hf["intermediate_size"],
            hf["vocab_size"], hf["max_position_embeddings"], hf["type_vocab_size"]) == (768, 12, 12, 3072, 30522,
                                                                                       512, 2)
    back, family = hf_config.from_hf(hf)
    assert family == "bert" and back.arch == "encoder" and back.norm_position == "post"
    for key in ("d_model", "num_layers", "num_heads", "head_dim", "d_ff", "vocab_size", "max_seq_len",
                "token_types", "norm_eps", "activation", "positional", "use_bias", "tie_embeddings"):
        assert getattr(back, key) == getattr(model, key), key
    for key, value in [("hidden_act", "gelu_new"), ("position_embedding_type", "relative_key"),
                       ("tie_word_embeddings", False)]:
        with pytest.raises(ConfigError, match=key):
            hf_config.from_hf({**hf, key: value})
    with pytest.raises(ConfigError, match="model.arch"):
        hf_config.guess_family(load_config(None, ["model.name=transformer-tiny", "train.objective=seq2seq"]).model)
