"""`maxmodel compile`: the real sharded step compiled for TPU topologies on this CPU host (libtpu)."""
import json

import pytest
from conftest import TINY

from maxmodel.cli import main as cli_main

pytest.importorskip("libtpu", reason="libtpu not installed (pip install 'maxmodel[tpu]'): TPU AOT compile unavailable")


def test_small_config_compiles_for_v5p_8(capsys):
    args = ["compile", "--topology", "v5p-8", "--json", *TINY, "mesh.data=2", "mesh.fsdp=2", "train.dtype=bfloat16"]
    assert cli_main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["devices"] == 4 and report["device_kind"].startswith("TPU v5")
    assert report["mesh"]["data"] == 2 and report["mesh"]["fsdp"] == 2
    assert 0 < report["needed_bytes"] < report["hbm_bytes_per_device"] and report["fits"]


@pytest.mark.parametrize("remat,offloaded", [("save_qkv_proj", False), ("qkv_proj_offloaded", True)])
def test_offloaded_remat_puts_activations_in_host_memory(capsys, remat, offloaded):
    args = ["compile", "--topology", "v5p-8", "--json", *TINY, "mesh.data=4", f"train.remat={remat}"]
    assert cli_main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["host_temp_bytes"] > 0) == offloaded


def test_splash_attention_compiles_for_tpu_and_needs_less_memory(capsys):
    """The Pallas kernel lowered by Mosaic inside its shard_map (interpret mode only on CPU); at 1024 tokens the
    XLA path's [L, L] scores already dominate the temporaries."""
    def temp(impl):
        args = ["compile", "--topology", "v5p-8", "--json", *TINY, "mesh.data=2", "mesh.fsdp=2", "train.seq_len=1024",
                "train.dtype=bfloat16", f"model.attention.impl={impl}"]
        assert cli_main(args) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["temp_bytes"]
    assert temp("splash") < 0.75 * temp("xla")


def test_layout_that_cannot_fit_exits_nonzero_with_the_per_chip_figure(capsys):
    # ~3.5B parameters replicated (data parallel only) with f32 Adam state: far above v5e's 16 GB per chip.
    args = ["compile", "--topology", "v5e-4", *TINY, "model.d_model=8192", "model.num_heads=64",
            "model.num_kv_heads=8", "model.d_ff=16384", "model.vocab_size=32000", "mesh.data=4"]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "does not fit" in err and "HBM" in err and "G" in err


def test_unknown_topology_exits_2(capsys):
    assert cli_main(["compile", "--topology", "v9x-8", *TINY]) == 2
    assert "--topology" in capsys.readouterr().err


def test_plan_compile_validates_the_chosen_layout(capsys):
    """`maxmodel plan --compile` compiles the planned model and layout for the TPU slice it planned for."""
    args = ["plan", "--chip", "v5p", "--chips", "4", "--days", "1e-5", "--vocab", "512", "--seq-len", "128",
            "--compile", "--json"]
    assert cli_main(args) == 0
    compiled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["compile"]
    assert compiled["topology"] == "v5p-8" and compiled["result"]["devices"] == 4
    assert compiled["result"]["fits"] and compiled["result"]["needed_bytes"] > 0
    assert compiled["result"]["estimate"]["compiled_bytes"] == compiled["result"]["needed_bytes"]


def test_planner_estimate_lands_within_tolerance_of_the_compiled_step(capsys, impl="splash", remat="none"):
    """A 1B-class shape (full llama3 widths take minutes per compile here: benchmarks/aot_memory.py has those,
    for every remat policy) with the TPU's kernel and no remat, where the saved activations weigh most: the
    planner's estimate for this config and mesh is within 15% of what XLA:TPU allocates. (XLA attention's [s, s] buffers are costed at 8 bytes per score, right at llama3-8b shapes;
    at this shape XLA keeps fewer and the estimate is ~1.15-1.2x.)"""
    args = ["compile", "--topology", "v5p-8", "--json", "model.d_model=2048", "model.num_heads=16",
            "model.num_kv_heads=8", "model.head_dim=128", "model.d_ff=8192", "model.num_layers=4",
            "model.vocab_size=32768", "model.max_seq_len=4096", "mesh.fsdp=4", "train.batch_size=4", "train.seq_len=4096",
            "train.dtype=bfloat16", f"train.remat={remat}", f"model.attention.impl={impl}"]
    assert cli_main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    e = report["estimate"]
    assert e["compiled_bytes"] == report["needed_bytes"]
    assert e["within_tolerance"], (e["ratio"], {k: v / 2**30 for k, v in e["parts"].items()})
