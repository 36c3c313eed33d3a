"""train.remat policies (models/remat.py): every policy trains exactly as no remat does, and keeping less
saves device memory in the compiled step."""
import jax
import numpy as np
import pytest
from flax import nnx
from test_train_step import TINY, run_steps

from maxmodel.config import load_config
from maxmodel.config.validate import CHOICES
from maxmodel.models.remat import POLICIES
from maxmodel.parallel.mesh import build_mesh
from maxmodel.parallel.rules import mesh_rules
from maxmodel.train.step import abstract_state, batch_keys, batch_sharding, build_train_step


def test_config_choices_are_the_policies():
    assert set(CHOICES["train.remat"]) == set(POLICIES)


@pytest.fixture(scope="module")
def no_remat():
    return run_steps(["train.remat=none"], jax.devices()[:1], steps=2)


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "none"])
def test_policy_trains_like_no_remat(policy, no_remat):
    np.testing.assert_allclose(run_steps([f"train.remat={policy}"], jax.devices()[:1], steps=2), no_remat,
                               rtol=1e-5)


def lowered(policy, extra=()):
    cfg = load_config(overrides=TINY + ["data.source=synthetic", f"train.remat={policy}", "train.seq_len=256",
                                        "model.d_ff=512", *extra])
    mesh = build_mesh(cfg.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_rules(cfg.mesh, mesh)):
        from maxmodel.train.checkpoint import abstract_like
        graphdef, abstract = abstract_state(cfg)
        ts = build_train_step(cfg, graphdef, abstract, mesh)
        sh = batch_sharding(mesh)
        shape = (cfg.train.batch_size, cfg.train.seq_len)
        batch = {k: jax.ShapeDtypeStruct(shape, np.float32 if k == "loss_mask" else np.int32, sharding=sh)
                 for k in batch_keys(cfg)}
        return ts.step_fn.lower(abstract_like(abstract, ts.param_shardings),
                                abstract_like(ts.abstract_opt, ts.opt_shardings), batch)


def test_remat_saves_device_memory_in_the_compiled_step():
    """(Offloading to host memory is shown on a TPU compile, tests/test_compile_tpu.py: XLA:CPU lowers the
    host placements to device ones.)"""
    temp = {p: lowered(p).compile().memory_analysis().temp_size_in_bytes for p in ("none", "save_qkv_proj", "full")}
    assert temp["full"] < temp["save_qkv_proj"] < temp["none"]
