"""Per-device memory accounting and the collectives the compiler inserts for a layout."""
import jax
import numpy as np
from conftest import TINY
from flax import nnx

from maxmodel.cli import main as cli_main
from maxmodel.config import load_config
from maxmodel.parallel.mesh import build_mesh
from maxmodel.parallel.rules import logical_rules
from maxmodel.train.shardings_cli import collect
from maxmodel.train.checkpoint import abstract_like
from maxmodel.train.step import abstract_state, batch_keys, batch_sharding, build_train_step


def test_fsdp_holds_an_eighth_of_the_parameters_per_device():
    # d_model and vocab divisible by 8 so every sharded dim splits evenly; norms (replicated) are tiny.
    cfg = load_config(overrides=TINY + ["mesh.data=1", "mesh.fsdp=8", "mesh.rules=fsdp"])
    out = collect(cfg, compile_step=False)
    total = sum(np.prod(p["shape"]) * 4 for p in out["parameters"])
    per_device = out["per_device_bytes"]["params"]
    norms = sum(np.prod(p["shape"]) * 4 for p in out["parameters"] if "norm" in p["logical"])
    assert per_device == (total - norms) / 8 + norms
    assert abs(per_device / total - 1 / 8) < 0.01
    # AdamW: mu and nu sharded like the params, plus replicated scalars (step counters, the loss guard's
    # counters and running loss statistics: under 64 bytes).
    assert abs(out["per_device_bytes"]["optimizer"] - 2 * per_device) <= 64


def test_tensor_parallel_hlo_has_collectives():
    cfg = load_config(overrides=TINY + ["data.source=synthetic", "mesh.data=2", "mesh.tensor=4",
                                      "model.num_kv_heads=4"])
    mesh = build_mesh(cfg.mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_rules("default")):
        graphdef, abstract = abstract_state(cfg)
        ts = build_train_step(cfg, graphdef, abstract, mesh)
        sh = batch_sharding(mesh)
        batch = {k: jax.ShapeDtypeStruct((8, 32), np.float32 if k == "loss_mask" else np.int32, sharding=sh)
                 for k in batch_keys(cfg)}
        hlo = ts.step_fn.lower(abstract_like(abstract, ts.param_shardings),
                               abstract_like(ts.abstract_opt, ts.opt_shardings), batch).compile().as_text()
    assert "all-reduce" in hlo or "reduce-scatter" in hlo


def test_shardings_cli_prints_table(capsys):
    assert cli_main(["shardings", *TINY, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]) == 0
    out = capsys.readouterr().out
    assert "layers.mlp.wi" in out and "('fsdp', 'tensor')" not in out.split("layers.mlp.wi")[0][-5:]
    assert "xla temp_bytes" in out and "activations_estimate" in out


def test_layout_errors_name_the_key_and_numbers(capsys):
    assert cli_main(["shardings", *TINY, "mesh.data=2", "mesh.tensor=4", "--no-compile"]) == 2
    assert "model.num_kv_heads" in capsys.readouterr().err  # 2 kv heads over tensor=4
    assert cli_main(["shardings", *TINY, "mesh.data=3", "--no-compile"]) == 2
    assert "does not match 8 devices" in capsys.readouterr().err


def test_zero1_shards_optimizer_state_over_data():
    plain = collect(load_config(overrides=TINY + ["mesh.data=8"]), compile_step=False)["per_device_bytes"]
    zero1 = collect(load_config(overrides=TINY + ["mesh.data=8", "mesh.zero1=true"]), compile_step=False)
    zero1 = zero1["per_device_bytes"]
    assert zero1["params"] == plain["params"]           # parameters stay replicated over data
    assert zero1["optimizer"] < plain["optimizer"] / 7   # moments split 8 ways (norm scales of 64 also divide)
