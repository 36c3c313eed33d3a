"""benchmarks/peers/hf_generate.py (the Hugging Face side of benchmarks/generate.py) on a tiny random llama,
in .venv-hf as the benchmark runs it; and benchmarks/membw.py's arithmetic. Skipped without .venv-hf."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
from pathlib import Path

import hf_oracle
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "hf_generate.py"
TINY = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    hf_oracle.require()
    directory = tmp_path_factory.mktemp("hf") / "tiny-llama"
    hf_oracle.run("build", json.dumps({"config": "LlamaConfig", "kwargs": TINY, "dir": str(directory)}))
    return directory


def hf_generate(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of maxmodel's venv
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([hf_oracle.require(), str(SCRIPT), *args, "--threads", "1"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_timing_fields(tiny_llama):
    out = hf_generate("--model", str(tiny_llama), "--prompt-len", "8", "--new-tokens", "4", "--batches", "1,2",
                      "--compile", "off", "--repeats", "1")
    assert set(out["decode_tokens_per_s"]) == {"1", "2"}
    assert all(positive(v) for v in out["decode_tokens_per_s"].values()), out
    assert positive(out["prefill_tokens_per_s"]) and positive(out["ttft_s"]), out
    assert out["mode"] == {"1": "eager", "2": "eager"} and out["cache"] == "static"


def test_greedy_tokens(tiny_llama, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([[5, 6, 7, 8], [9, 10, 11]]))
    args = ("--model", str(tiny_llama), "--greedy-tokens", str(prompts), "--new-tokens", "5")
    out = hf_generate(*args)
    assert [len(t) for t in out["tokens"]] == [5, 5]
    assert all(0 <= i < TINY["vocab_size"] for t in out["tokens"] for i in t)
    assert hf_generate(*args)["tokens"] == out["tokens"]  # greedy: deterministic


def test_membw():
    # by path: benchmarks/ is scripts, not a package on the test's import path
    spec = importlib.util.spec_from_file_location("membw", SCRIPT.parents[1] / "membw.py")
    membw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(membw)
    bandwidth_bound_tokens_per_s, copy_bandwidth_gbps = membw.bandwidth_bound_tokens_per_s, membw.copy_bandwidth_gbps
    assert bandwidth_bound_tokens_per_s(2e8, 10.0) == pytest.approx(50.0)
    assert bandwidth_bound_tokens_per_s(2e8, 10.0, batch=16) == pytest.approx(800.0)
    assert positive(copy_bandwidth_gbps(mib=8, repeats=1, threads=2))
