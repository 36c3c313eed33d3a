"""`maxmodel convert`: the tokenizer travels both ways and is usable by the data pipeline; bad input exits 2.
transformers builds and reloads the models out of process (tests/hf_oracle.py, with .venv-hf's Python)."""
from __future__ import annotations

import json

import hf_oracle
import pytest

from maxmodel.cli import main
from maxmodel.data.tokenizer import load_tokenizer


def _tokenizer_json(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["<unk>", "the", "cat", "sat", "</s>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


@pytest.fixture
def hf_llama(tmp_path):
    hf_oracle.require()
    config = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32}
    hf_oracle.run("build", json.dumps({"config": "LlamaConfig", "kwargs": config, "dir": str(tmp_path / "hf")}))
    _tokenizer_json(tmp_path / "hf" / "tokenizer.json")
    return tmp_path / "hf"


def test_round_trip_carries_tokenizer_and_writes_run_config(hf_llama, tmp_path, capsys):
    init, back = tmp_path / "init", tmp_path / "back"
    assert main(["convert", "from-hf", str(hf_llama), "--out", str(init), "--unscanned"]) == 0
    info = json.loads((init / "export.json").read_text())
    assert info["hf_model_type"] == "llama" and info["scan_layers"] is False
    assert info["model"]["num_kv_heads"] == 1 and info["model"]["d_ff"] == 32
    tok = load_tokenizer(str(init / "tokenizer.json"))
    assert tok.encode("the cat sat") == [1, 2, 3]
    from maxmodel.config import load_config
    cfg = load_config(str(init / "config.yaml"), [f"init.from={init}"])
    assert cfg.model.num_layers == 2 and cfg.train.scan_layers is False
    assert cfg.data.tokenizer == str(init / "tokenizer.json")

    assert main(["convert", "to-hf", str(init), "--out", str(back), "--dtype", "bfloat16"]) == 0
    assert (back / "tokenizer.json").read_text() == (hf_llama / "tokenizer.json").read_text()
    reloaded = hf_oracle.run("load", str(back))
    assert reloaded["class"] == "LlamaForCausalLM" and reloaded["dtypes"] == ["torch.bfloat16"]
    assert reloaded["loading"] == {}, reloaded["loading"]


def test_bad_input_exits_2(tmp_path, capsys):  # fails before any tensor is read: no oracle needed
    assert main(["convert", "from-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bloom", "vocab_size": 64}))
    assert main(["convert", "from-hf", str(hf), "--out", str(tmp_path / "o")]) == 2
    assert "model_type" in capsys.readouterr().err
    assert main(["convert", "to-hf", str(hf), "--out", str(tmp_path / "o2")]) == 2
    assert "export.json" in capsys.readouterr().err
