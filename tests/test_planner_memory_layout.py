"""Activation memory (the remat policies, Korthikanti et al. 2022), training state, hardware catalog, layouts."""
import pytest

from maxmodel.config import ConfigError
from maxmodel.planner.hardware import CHIPS, GiB, default_topology, get_chip
from maxmodel.planner.layout import HBM_USABLE, choose_layout
from maxmodel.planner.memory import (activation_bytes, attention_working_bytes, korthikanti_layer_bytes,
                                     layer_activation_bytes, logits_bytes, state_bytes)


def test_saved_activations_follow_the_remat_policies():
    # What each policy keeps (models/remat.py) per token and layer, in compute-dtype widths: d, d+q+2k, ...
    s, b = 4096, 1
    llama = {**_model(4096, 32, 32, 8, 14336), "vocab_size": 128256}
    d, q, k, f = 4096, 4096, 1024, 14336
    saved = {r: layer_activation_bytes(llama, s, b, remat=r) / (2 * s * b)
             for r in ("full", "save_qkv_proj", "save_dot_except_mlp", "save_dots", "qkv_proj_offloaded")}
    assert saved == {"full": d, "save_qkv_proj": d + q + 2 * k, "save_dot_except_mlp": 2 * d + q + 2 * k,
                     "save_dots": 3 * d + q + 2 * k + 2 * f, "qkv_proj_offloaded": d}
    none = layer_activation_bytes(llama, s, b, remat="none")
    assert none > 2 * s * b * saved["save_dots"]
    # XLA attention keeps the [s, s] probabilities of every head; a flash kernel only a log-sum-exp per row.
    assert layer_activation_bytes(llama, s, b, flash=False) - none == pytest.approx(6 * 32 * s * s * b, rel=1e-3)
    # Tensor parallelism splits every term (sequence parallelism the d-wide ones too).
    assert layer_activation_bytes(llama, s, b, tensor=4) == pytest.approx(none / 4)
    assert layer_activation_bytes(llama, s, b, tensor=4, sequence_parallel=False) > none / 4


def test_working_sets_the_head_and_a_rebuilt_layer():
    llama = {**_model(4096, 32, 32, 8, 14336), "vocab_size": 128256}
    s = 8192
    head = logits_bytes(llama, s, 1)
    assert head == 6 * s * 128256                      # float32 and bf16 logits
    assert logits_bytes(llama, s, 1, loss_chunk=512) == 6 * 512 * 128256
    assert logits_bytes(llama, s, 1, gathered_tables=True) == head + 2 * 2 * 4096 * 128256
    assert attention_working_bytes(llama, s, 1) == 0   # flash: tiles only
    assert attention_working_bytes(llama, s, 1, flash=False) == 8 * 32 * s * s
    # The head's logits may use the room of layer gradients that do not exist yet.
    # A layer's backward temporaries are as large as what it keeps without remat.
    stored = 32 * layer_activation_bytes(llama, s, 1, remat="full")
    layer = layer_activation_bytes(llama, s, 1, remat="none")
    assert head > layer
    assert activation_bytes(llama, s, 1, remat="full") == stored + head
    assert activation_bytes(llama, s, 1, remat="full", layer_grad_bytes=head) == stored + layer


def test_korthikanti_gpt3_numbers():
    # For GPT-3 (s=2048, h=12288, a=96) the score term 5as/h = 80 dominates the 34 (Section 4.1), so
    # selective recomputation removes 70% of the activation memory (80/114).
    full = korthikanti_layer_bytes(2048, 1, 12288, 96)
    sel = korthikanti_layer_bytes(2048, 1, 12288, 96, recompute="selective")
    assert 1 - sel / full == pytest.approx(80 / 114, rel=1e-9)


def test_state_bytes():
    # Mixed precision with float32 params and AdamW: 4 (params) + 4 (grads) + 8 (two moments) = 16 bytes.
    st = state_bytes(1e9, 1, "float32", "adamw")
    assert sum(st.values()) == 16e9
    assert sum(state_bytes(1e9, 8, "bfloat16", "sgd").values()) == pytest.approx(4e9 / 8)


def test_hardware_catalog():
    # bf16 dense peaks from the vendors' pages (see hardware.py): v5p 459 TF, H100 989 TF (not the
    # 1979 sparse figure), H200 141 GB HBM3e at 4.8 TB/s, v5e 16 GiB.
    assert get_chip("v5p").bf16_flops == 459e12 and get_chip("V5P").name == "v5p"
    assert get_chip("h100").bf16_flops == 989e12
    assert get_chip("h200").hbm_bytes == 141e9 and get_chip("h200").hbm_bw == 4.8e12
    assert get_chip("v5e").hbm_bytes == 16 * GiB
    assert set(CHIPS) == {"v4", "v5e", "v5p", "v6e", "a100-80gb", "h100", "h200", "b200"}
    with pytest.raises(ConfigError, match="--chip.*unknown chip 'tpu9'"):
        get_chip("tpu9")
    assert default_topology(get_chip("v5p"), 8) == "v5p:2x2x2"
    assert default_topology(get_chip("v5e"), 8) == "v5e:2x4"
    with pytest.raises(ConfigError, match="--compile"):
        default_topology(get_chip("h100"), 8)


def _model(d, layers, heads, kv, ff, vocab=32000):
    return {"d_model": d, "num_layers": layers, "num_heads": heads, "num_kv_heads": kv, "head_dim": 128, "d_ff": ff,
                "vocab_size": vocab, "activation": "swiglu"}


def test_small_model_gets_plain_data_parallelism():
    m = _model(2048, 16, 16, 8, 5632)                  # ~1B
    res = choose_layout(m, 1.0e9, get_chip("h100"), 8, 256, 2048, 6 * 1e9 * 256 * 2048, 0.4)
    c = res["chosen"]
    assert res["fits"] and c["mesh"]["tensor"] == 1 and c["mesh"]["stage"] == 1
    assert c["memory_gib"]["total"] <= HBM_USABLE * 80e9 / GiB
    assert "fits in" in res["why"]


def test_70b_needs_sharding_and_does_not_fit_eight_v5e():
    m = _model(8192, 80, 64, 8, 28672)
    n = 6.9e10
    big = choose_layout(m, n, get_chip("v5p"), 256, 1024, 4096, 6 * n * 1024 * 4096, 0.4)
    c = big["chosen"]
    assert big["fits"]
    shards = c["mesh"]["fsdp"] * c["mesh"]["tensor"] * c["mesh"]["stage"]
    assert 16 * n / shards < HBM_USABLE * 95 * GiB          # the state had to be sharded to fit
    assert shards >= 12
    assert "plain data parallelism would need" in big["why"]
    small = choose_layout(m, n, get_chip("v5e"), 8, 64, 4096, 6 * n * 64 * 4096, 0.4)
    assert not small["fits"] and "no layout fits" in small["why"]
