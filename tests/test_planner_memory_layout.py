"""Activation memory (Korthikanti et al. 2022), training state, hardware catalog and layout choice."""
import pytest

from maxmodel.config import ConfigError
from maxmodel.planner.hardware import CHIPS, GiB, default_topology, get_chip
from maxmodel.planner.layout import HBM_USABLE, choose_layout
from maxmodel.planner.memory import korthikanti_layer_bytes, layer_activation_bytes, state_bytes

# GPT-3 175B as in Korthikanti et al. 2022, Table 3: h=12288, a=96, s=2048, micro-batch 1, t=8.
GPT3 = {"d_model": 12288, "num_heads": 96, "num_kv_heads": 96, "head_dim": 128, "d_ff": 4 * 12288, "activation": "gelu",
            "num_layers": 96, "vocab_size": 51200}


@pytest.mark.parametrize("t,sp", [(1, False), (8, False), (8, True)])
def test_itemised_activations_equal_korthikanti_formulas(t, sp):
    # Section 4: sbh(34 + 5as/h) without parallelism, sbh(10 + 24/t + 5as/(ht)) with tensor parallelism,
    # sbh(34 + 5as/h)/t with sequence parallelism. Exact for a GPT layer with dropout and stored scores.
    s, b, h, a = 2048, 1, 12288, 96
    ours = layer_activation_bytes(GPT3, s, b, tensor=t, sequence_parallel=sp, flash=False, dropout=True)
    assert ours == korthikanti_layer_bytes(s, b, h, a, t, sp)
    # Selective recompute drops the 5as/h term; we keep a float32 log-sum-exp per row (4·a·s·b), < 0.2%.
    sel = layer_activation_bytes(GPT3, s, b, tensor=t, sequence_parallel=sp, remat="save_dots", dropout=True)
    assert sel == pytest.approx(korthikanti_layer_bytes(s, b, h, a, t, sp, "selective"), rel=2e-3)
    full = layer_activation_bytes(GPT3, s, b, tensor=t, sequence_parallel=sp, remat="full")
    assert full == korthikanti_layer_bytes(s, b, h, a, t, sp, "full")


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
