"""Hugging Face interop: tiny random transformers models (built from configs, nothing downloaded) converted to
maxmodel give the same logits (float32, max abs diff < 1e-4), and convert back to identical tensors."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from maxmodel.config.loader import config_from_dict
from maxmodel.interop import convert
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
}
SEQ = 24  # longer than the sliding windows, so local and global layers differ


def _hf_model(kind: str, directory: Path):
    cls_name, kwargs = CASES[kind]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # random everything (norm scales and biases too), not the structured init
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(directory, max_shard_size="20KB")  # several shards + index
    return model


def _our_logits(init: Path, tokens: np.ndarray, scan: bool) -> np.ndarray:
    info = json.loads((init / "export.json").read_text())
    cfg = config_from_dict({"model": info["model"], "train": {"scan_layers": scan, "seq_len": SEQ}})
    mesh = build_mesh(cfg.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_rules("default")):
        graphdef, abstract = abstract_state(cfg)
        params = load_params(str(init), abstract_like(abstract, concrete_shardings(abstract, mesh)))
        return np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens)))


@pytest.mark.parametrize("kind", list(CASES))
def test_logit_parity_and_round_trip(kind, tmp_path):
    hf_dir, init, back = tmp_path / "hf", tmp_path / "init", tmp_path / "back"
    model = _hf_model(kind, hf_dir)
    assert (hf_dir / "model.safetensors.index.json").is_file()
    tokens = np.random.default_rng(1).integers(0, 97, size=(2, SEQ))
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    scan = kind != "llama_gqa"  # one case through the unscanned layout
    convert.from_hf(str(hf_dir), str(init), scan_layers=scan)
    ours = _our_logits(init, tokens, scan)
    assert ours.shape == expected.shape
    diff = float(np.max(np.abs(ours - expected)))
    assert diff < 1e-4, f"{kind}: max abs logit difference {diff}"

    convert.to_hf(str(init), str(back), max_shard_bytes=30_000)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).float()
    assert type(reloaded) is type(model)
    original, restored = model.state_dict(), reloaded.state_dict()
    assert set(original) == set(restored)
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name
