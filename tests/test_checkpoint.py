"""Checkpointer: retention, save schedule, emergency local checkpoints, damaged checkpoints, resharding restore."""
import logging
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from maxmodel.config import load_config
from maxmodel.config.schema import CheckpointConfig
from maxmodel.parallel.mesh import build_mesh
from maxmodel.parallel.rules import mesh_rules
from maxmodel.train.checkpoint import MANIFEST, Checkpointer, abstract_like
from maxmodel.train.step import abstract_state, build_train_step, create_params


def small_state(seed: int):
    """A params / opt_state pair sharded over all 8 devices, values depending on `seed`."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(seed)
    sh = NamedSharding(mesh, PartitionSpec("x"))
    params = {"w": jax.device_put(rng.standard_normal((64, 16), np.float32), sh),
              "b": jax.device_put(rng.standard_normal((8,), np.float32), sh)}
    opt = {"mu": jax.device_put(rng.standard_normal((64, 16), np.float32), sh)}
    return params, opt


def target_of(params, opt):
    abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t)
    return {"params": abstract(params), "opt_state": abstract(opt)}


def save_steps(ckpt, steps, last_step=1000):
    for step in steps:
        due = ckpt.due(step, last_step)
        if due:
            params, opt = small_state(step)
            ckpt.save(step, due, params, opt, {"position": step}, {"note": "test"})
    ckpt.wait()


def test_retention_keeps_latest_and_every_kth(tmp_path):
    ckpt = Checkpointer(CheckpointConfig(every_steps=1, keep=2, keep_every=4, async_=False), tmp_path / "c")
    save_steps(ckpt, range(1, 10))
    assert sorted(ckpt.persistent.all_steps()) == [4, 8, 9]
    ckpt.close()


def test_minute_interval_and_last_step(tmp_path):
    now = [0.0]
    ckpt = Checkpointer(CheckpointConfig(every_steps=0, every_minutes=2.0), tmp_path / "c", clock=lambda: now[0])
    assert ckpt.due(1, 10) == []
    now[0] = 119.0
    assert ckpt.due(2, 10) == []
    now[0] = 121.0
    assert ckpt.due(3, 10) == [ckpt.persistent]
    assert ckpt.due(10, 10) == [ckpt.persistent]  # the last step always saves
    ckpt.close()


def test_emergency_local_checkpoints_restore_the_newest_valid(tmp_path, caplog):
    cfg = CheckpointConfig(every_steps=4, keep=2, local_dir=str(tmp_path / "local"), local_every_steps=1,
                           local_keep=2)
    ckpt = Checkpointer(cfg, tmp_path / "persistent")
    save_steps(ckpt, range(1, 7))
    assert sorted(ckpt.persistent.all_steps()) == [4] and sorted(ckpt.local.all_steps()) == [5, 6]
    target = target_of(*small_state(0))
    restored = ckpt.restore_latest(target)
    assert restored.step == 6 and restored.directory == str(tmp_path / "local")
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(small_state(6)[0]["w"]))
    assert restored.data == {"position": 6} and restored.meta["step"] == 6
    # Both local steps damaged (say the VM's disk was lost mid-write): the persistent step 4 is next.
    for step in (5, 6):
        (tmp_path / "local" / str(step) / "params" / "_METADATA").unlink()
    with caplog.at_level(logging.WARNING, "maxmodel.checkpoint"):
        restored = ckpt.restore_latest(target)
    assert restored.step == 4 and restored.directory == str(tmp_path / "persistent")
    assert "missing file params/_METADATA" in caplog.text
    ckpt.close()


def largest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("with_manifest", [True, False], ids=["manifest", "crashed-before-manifest"])
def test_truncated_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog, with_manifest):
    ckpt = Checkpointer(CheckpointConfig(every_steps=1, keep=3), tmp_path / "c")
    save_steps(ckpt, [1, 2])
    step_dir = tmp_path / "c" / "2"
    victim = largest_file(step_dir)
    rel = victim.relative_to(step_dir)
    half = victim.stat().st_size // 2
    victim.write_bytes(victim.read_bytes()[:half])
    if not with_manifest:  # then the damage shows only when orbax/tensorstore read the file
        (step_dir / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, "maxmodel.checkpoint"):
        restored = ckpt.restore_latest(target_of(*small_state(0)))
    assert restored.step == 1
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(small_state(1)[0]["w"]))
    assert "checkpoint" in caplog.text and "damaged" in caplog.text and "falling back" in caplog.text
    # Never deleted: moved aside, intact as found, and out of the way of a new save of step 2.
    kept = tmp_path / "c" / "damaged" / "2" / rel
    assert kept.is_file() and kept.stat().st_size == half
    assert not step_dir.exists() and sorted(ckpt.persistent.all_steps()) == [1]
    save_steps(ckpt, [2])
    assert sorted(ckpt.persistent.all_steps()) == [1, 2]
    ckpt.close()


def test_resharding_restore_fsdp8_to_data2_tensor2_on_4_devices(tmp_path):
    def setup(mesh_overrides, devices):
        cfg = load_config(overrides=TINY + ["data.source=synthetic"] + mesh_overrides)
        mesh = build_mesh(cfg.mesh, devices=devices)
        return cfg, mesh, mesh_rules(cfg.mesh, mesh)

    cfg, mesh, rules = setup(["mesh.data=1", "mesh.fsdp=8"], jax.devices())
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        graphdef, abstract = abstract_state(cfg)
        ts = build_train_step(cfg, graphdef, abstract, mesh)
        params = create_params(cfg, ts.param_shardings)
        opt_state = ts.init_opt(params)
        opt_state = jax.tree.map(lambda x: x + 0.5 if x.dtype == np.float32 else x, opt_state)  # non-trivial
        ckpt = Checkpointer(CheckpointConfig(every_steps=1), tmp_path / "c")
        ckpt.save(7, ckpt.due(7, 7), params, opt_state, {}, {})
        ckpt.close()
    saved_params, saved_opt = jax.device_get(params), jax.device_get(opt_state)

    cfg4, mesh4, rules4 = setup(["mesh.data=2", "mesh.tensor=2", "mesh.fsdp=1"], jax.devices()[:4])
    with jax.set_mesh(mesh4), nnx.logical_axis_rules(rules4):
        graphdef, abstract = abstract_state(cfg4)
        ts4 = build_train_step(cfg4, graphdef, abstract, mesh4)
        target = {"params": abstract_like(abstract, ts4.param_shardings),
                  "opt_state": abstract_like(ts4.abstract_opt, ts4.opt_shardings)}
        restored = Checkpointer(CheckpointConfig(), tmp_path / "c").restore_latest(target)
    assert restored.step == 7
    leaves = jax.tree.leaves(restored.params)
    assert all(len(x.sharding.device_set) == 4 for x in leaves)
    assert any("tensor" in str(x.sharding.spec) for x in leaves)  # really laid out on the new mesh
    for a, b in zip(jax.tree.leaves(saved_params), jax.tree.leaves(jax.device_get(restored.params))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(saved_opt), jax.tree.leaves(jax.device_get(restored.opt_state))):
        np.testing.assert_array_equal(a, b)


def test_fault_tolerance_config_keys_are_checked():
    from maxmodel.config import ConfigError
    cfg = load_config(overrides=["init.from=/some/export", "checkpoint.keep_every=1000", "train.spike_sigma=6"])
    assert cfg.init.from_ == "/some/export" and cfg.checkpoint.keep_every == 1000
    for overrides, key in ((["train.on_nonfinite=ignore"], "train.on_nonfinite"),
                           (["checkpoint.local_dir=/tmp/x"], "checkpoint.local_every_steps"),
                           (["checkpoint.local_every_steps=5"], "checkpoint.local_dir"),
                           (["train.spike_decay=1.5"], "train.spike_decay"),
                           (["checkpoint.every_minutes=-1"], "checkpoint.every_minutes")):
        with pytest.raises(ConfigError) as e:
            load_config(overrides=overrides)
        assert e.value.key == key
