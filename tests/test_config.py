import json

import pytest

from maxmodel.cli import main as cli_main
from maxmodel.config import ConfigError, load_config


def test_overrides_typed_and_reach_the_model():
    cfg = load_config(overrides=["model.d_model=96", "model.num_heads=2", "optimizer.lr=1e-3",
                                 "train.scan_layers=false", "checkpoint.async=false"])
    assert cfg.model.d_model == 96 and cfg.model.head_dim == 48  # derived from d_model / num_heads
    assert cfg.optimizer.lr == pytest.approx(1e-3) and cfg.train.scan_layers is False
    assert cfg.checkpoint.async_ is False


def test_overrides_change_parameter_shapes(capsys):
    assert cli_main(["config", "show", "--json", "model.d_model=64", "model.num_layers=2", "model.d_ff=128",
                     "model.vocab_size=300"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["d_model"] == 64
    # embed 300*64 + head 64*300 + 2 layers (q 64*64 + k,v 2*64*32 + o 64*64 + mlp 3*64*128 + 2 norms) + norm
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert out["params"]["total"] == 2 * 300 * 64 + 2 * per_layer + 64
    assert out["params"]["non_embedding"] == 2 * per_layer + 64


@pytest.mark.parametrize("override, key", [
    ("model.dmodel=64", "model.d_model"),             # typo: names the closest valid key
    ("trian.steps=3", "train"),
    ("model.num_heads=four", "model.num_heads"),        # wrong type
    ("train.scan_layers=maybe", "train.scan_layers"),
    ("model.num_kv_heads=3", "model.num_kv_heads"),     # 4 heads not divisible by 3 kv heads
    ("model.activation=tanh", "model.activation"),
    ("train.steps=0", "train.steps"),
    ("mesh.data=0", "mesh.data"),
    ("model.name=nope", "model.name"),
])
def test_bad_config_exits_2_naming_the_key(override, key, capsys):
    assert cli_main(["config", "show", override]) == 2
    err = capsys.readouterr().err
    assert key in err, err


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'model.d_model'"):
        load_config(overrides=["model.dmodel=64"])


def test_experiment_file_layers_and_errors_name_the_file(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("model:\n  num_layers: 3\ntrain:\n  steps: 7\n")
    cfg = load_config(exp, ["train.steps=9"])
    assert cfg.model.num_layers == 3 and cfg.train.steps == 9  # overrides beat the file
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 7\n")
    with pytest.raises(ConfigError, match="bad.yaml") as e:
        load_config(bad)
    assert e.value.key == "train.stepz"


def test_train_cli_bad_config_exit_code(capsys):
    assert cli_main(["train", "model.num_kv_heads=3"]) == 2
    assert "model.num_kv_heads" in capsys.readouterr().err
