"""The objective interface (maxmodel/finetune/objectives): every objective found by name, the refactor onto it
left pretraining numerics unchanged to the last bit, and a bad objective is a config error."""
import json

import pytest
from objective_reference import CASES, REFERENCE, run

from maxmodel.config import ConfigError, load_config
from maxmodel.finetune import objectives


def test_every_objective_is_a_module_with_its_keys():
    assert {"causal_lm", "masked_lm", "prefix_lm", "seq2seq", "sft"} <= set(objectives.names())
    assert objectives.get("prefix_lm").extra_keys == ("prefix_mask",)
    assert objectives.get("seq2seq").archs == ("encoder_decoder",)


@pytest.mark.parametrize("name", list(CASES))
def test_losses_equal_the_code_before_the_refactor(name, tmp_path):
    """Losses of the first steps (and the held-out loss) equal the ones recorded from the inline-loss step
    before this refactor (tests/objective_reference.py). They were bit-identical on the recording machine; on
    another CPU XLA's generated code may round the last bits of a float32 sum differently, hence 1e-6."""
    got, want = run(name, str(tmp_path)), json.loads(REFERENCE.read_text())[name]
    def floats(d):
        held_out = float.fromhex(d["eval_loss"]) if d["eval_loss"] else float("nan")  # nan: no held-out batch
        return {k: float.fromhex(v) for k, v in d["losses"].items()} | {"eval": held_out}
    assert floats(got) == pytest.approx(floats(want), rel=1e-6, abs=0, nan_ok=True)


@pytest.mark.parametrize("overrides, key", [
    (["train.objective=dpo_typo"], "train.objective"),
    (["train.objective=sft", "data.format=text", "data.source=builtin"], "data.format"),
    (["train.objective=sft", "model.name=bert-tiny"], "train.objective"),
])
def test_bad_objective_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert e.value.key == key
