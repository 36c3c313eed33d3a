"""`maxmodel generate` and model loading: models converted from Hugging Face greedy-decode exactly the tokens
transformers' `generate` gives (transformers out of process, tests/hf_oracle.py); run and export
directories generate as they are; bad input exits 2 naming it."""
from __future__ import annotations

import json

import hf_oracle
import numpy as np
import pytest

from maxmodel.cli import main as cli
from maxmodel.inference.load import load_engine
from maxmodel.inference.sampling import SamplingOptions
from maxmodel.interop import convert

SMALL = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 64}
CASES = {
    "llama_gqa": ("LlamaConfig", dict(SMALL, num_key_value_heads=2)),
    "mistral_sliding_window": ("MistralConfig", dict(SMALL, num_key_value_heads=2, sliding_window=5)),
    "gemma2": ("Gemma2Config", dict(SMALL, num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
                                    sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=3.0)),
    "mixtral": ("MixtralConfig", dict(SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
}
NEW = 12  # past the sliding windows (5), so local layers really drop keys


@pytest.mark.parametrize("kind", list(CASES))
def test_converted_model_greedy_decodes_what_transformers_generates(kind, tmp_path):
    hf_oracle.require()
    cls_name, kwargs = CASES[kind]
    hf_dir, init = tmp_path / "hf", tmp_path / "init"
    hf_oracle.run("build", json.dumps({"config": cls_name, "kwargs": kwargs, "dir": str(hf_dir), "seed": 0,
                                       "std": 0.3}))
    convert.from_hf(str(hf_dir), str(init))
    prompts = [list(map(int, np.random.default_rng(i).integers(3, 97, n))) for i, n in enumerate((4, 9))]
    expected = hf_oracle.run("generate", str(hf_dir), json.dumps(prompts), str(NEW))["tokens"]
    gen = load_engine(init, ["data.tokenizer=bytes", "run.cpu_devices=1", "mesh.data=1"], max_slots=2,
                      max_len=64, prefill_buckets=(16,))
    outs = gen.generate(prompts, SamplingOptions(max_new_tokens=NEW, temperature=0.0, ignore_eos=True))
    assert [o.completions[0].token_ids for o in outs] == expected


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from conftest import TINY
    out = tmp_path_factory.mktemp("gen")
    # trained on a layout that one device cannot hold: generation takes the devices it is given
    args = TINY + [f"run.output_dir={out}", "run.name=r", "train.steps=2", "data.source=builtin",
                   "checkpoint.every_steps=2", "checkpoint.async=false", "mesh.data=4", "mesh.fsdp=2"]
    assert cli(["train", *args]) == 0
    return out / "r"


def test_generate_from_a_run_and_from_its_export(run_dir, tmp_path, capsys):
    argv = ["--prompt", "The ", "--max-new-tokens", "5", "--json", "--max-batch", "2"]
    assert cli(["generate", str(run_dir), *argv]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    completion = first["completions"][0]
    assert first["prompt"] == "The " and len(completion["tokens"]) <= 5 and completion["finish_reason"]
    assert len(completion["logprobs"]) == len(completion["tokens"])
    assert cli(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "tokenizer.model").is_file()  # the run's sentencepiece model travels along
    capsys.readouterr()
    assert cli(["generate", str(tmp_path / "exp"), *argv]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["completions"][0]["tokens"] == completion["tokens"]  # same weights, same greedy tokens


def test_generate_bad_input_exits_2_naming_it(run_dir, tmp_path, capsys):
    assert cli(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a model directory" in capsys.readouterr().err
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    assert cli(["generate", str(run_dir), "--prompts", str(bad)]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    assert cli(["generate", str(run_dir), "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_chat_prompts_use_the_models_jinja_template(run_dir, tmp_path):
    """A tokenizer_config.json chat template beside the weights renders the conversation (with its own BOS
    text, so none is added); without one, the simple training template with BOS."""
    model = tmp_path / "exp"
    assert cli(["export", "--run-dir", str(run_dir), "--out", str(model)]) == 0
    gen = load_engine(model, ["run.cpu_devices=1", "mesh.data=1"], max_slots=1, max_len=64, prefill_buckets=(32,))
    messages = [{"role": "user", "content": "hi"}]
    assert gen.chat_template is None
    assert gen.encode_chat(messages) == [gen.tokenizer.bos_id] + gen.tokenizer.encode("<|user|>\nhi<|end|>\n<|assistant|>\n")
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    gen = load_engine(model, ["run.cpu_devices=1", "mesh.data=1"], max_slots=1, max_len=64, prefill_buckets=(32,))
    assert gen.render_chat(messages) == "<s>[user] hi\n[assistant] "
    assert gen.encode_chat(messages) == gen.tokenizer.encode("<s>[user] hi\n[assistant] ")
    out = gen.generate([gen.encode_chat(messages)], SamplingOptions(max_new_tokens=3, temperature=0.0))[0]
    assert out.completions[0].finish_reason in ("stop", "length")
