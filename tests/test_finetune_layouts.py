"""Every fine-tuning method on every kind of layout: 8 emulated devices with fsdp x tensor sharding and a
pipeline layout give the 1-device losses and grad norms (float32, 3 steps; test_parallel_equivalence.py's
comparison), and every method stopped and resumed from its checkpoint continues bitwise like an
uninterrupted run (test_fault_tolerance.py's pattern); SIGTERM on a peft run checkpoints and exits 3 as in
pretraining, and the CLI's log starts with the trainable share and state bytes."""
import jax
import numpy as np
import pytest
from test_fault_tolerance import _launch_and_terminate, _metrics, assert_trees_equal
from test_train_step import run_steps

from maxmodel.config import load_config
from maxmodel.train.loop import train

METHODS = {
    "lora": ["peft.method=lora", "peft.targets=all", "peft.rank=4"],
    "qlora-nf4": ["peft.method=qlora", "peft.targets=all", "peft.rank=4", "peft.quant=nf4"],
    "prompt": ["peft.method=prompt", "peft.num_virtual_tokens=4"],
    "adapter": ["peft.method=adapter", "peft.adapter_dim=8"],
    "qat-int8": ["train.qat=int8"],
}
# LoRA dropout draws its masks over the whole batch (jax's partitionable threefry: the same bits however the
# batch is sharded), so sharded layouts keep the 1-device losses; a pipeline draws per microbatch instead.
DROPOUT = ["peft.method=lora", "peft.targets=all", "peft.rank=4", "peft.dropout=0.3"]
LAYOUTS = {
    "data=2 x fsdp=2 x tensor=2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    "stage=2 pipeline x data=4": ["mesh.data=4", "mesh.stage=2", "mesh.rules=pipeline", "pipeline.microbatches=2"],
}
# a learning rate at which the adapters move visibly in 3 steps (B = 0 / zero up-projections start flat)
COMMON = ["optimizer.lr=1e-2", "optimizer.weight_decay=0"]
SINGLE = {}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("method", list(METHODS))
def test_layout_equals_single_device(method, layout):
    if method not in SINGLE:
        SINGLE[method] = run_steps(COMMON + METHODS[method] + ["mesh.data=1"], jax.devices()[:1])
    sharded = run_steps(COMMON + METHODS[method] + LAYOUTS[layout], jax.devices())
    np.testing.assert_allclose(sharded, SINGLE[method], rtol=1e-5)
    assert SINGLE[method][-1, 1] != SINGLE[method][0, 1]  # the trainable state moved between steps


def test_lora_dropout_on_a_sharded_layout_equals_single_device():
    single = run_steps(COMMON + DROPOUT + ["mesh.data=1"], jax.devices()[:1])
    sharded = run_steps(COMMON + DROPOUT + LAYOUTS["data=2 x fsdp=2 x tensor=2"], jax.devices())
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    if "lora" not in SINGLE:
        SINGLE["lora"] = run_steps(COMMON + METHODS["lora"] + ["mesh.data=1"], jax.devices()[:1])
    plain = SINGLE["lora"]  # B = 0 at first: step 1 is dropout's no-op; later steps train differently
    assert single[0, 0] == plain[0, 0] and not np.allclose(single[1:, 0], plain[1:, 0])


def test_qlora_under_a_1f1b_pipeline_equals_single_device():
    """1F1B differentiates the stages itself (parallel/pipeline_1f1b.py): the quantized base's integer codes
    ride along ungradiented, the adapters get the 1-device gradients."""
    if "qlora-nf4" not in SINGLE:
        SINGLE["qlora-nf4"] = run_steps(COMMON + METHODS["qlora-nf4"] + ["mesh.data=1"], jax.devices()[:1])
    piped = run_steps(COMMON + METHODS["qlora-nf4"] + ["mesh.data=4", "mesh.stage=2", "pipeline.microbatches=2",
                                                        "pipeline.schedule=1f1b"], jax.devices())
    np.testing.assert_allclose(piped, SINGLE["qlora-nf4"], rtol=1e-5)


@pytest.mark.parametrize("method", [*METHODS, "lora-dropout"])
def test_stop_and_resume_is_exact(method, tiny_overrides):
    steps = ["train.steps=4", "run.log_every=1", "run.eval_batches=0", "run.eval_every=1000",
             "checkpoint.every_steps=2", "checkpoint.keep=10"]
    over = tiny_overrides + COMMON + (DROPOUT if method == "lora-dropout" else METHODS[method]) + steps
    full = train(load_config(overrides=over + ["run.name=full"]))
    first = train(load_config(overrides=over + ["run.name=split"]), stop_at_step=2)
    second = train(load_config(overrides=over + ["run.name=split"]))
    assert (first.final_step, second.start_step, second.final_step) == (2, 2, 4)
    assert [first.losses[s] for s in (1, 2)] + [second.losses[s] for s in (3, 4)] == [full.losses[s] for s in
                                                                                       (1, 2, 3, 4)]  # bitwise
    assert_trees_equal(jax.device_get(full.params), jax.device_get(second.params))


def test_sigterm_on_a_qlora_run_checkpoints_exits_3_and_logs_its_state(tiny_overrides, tmp_path):
    args = tiny_overrides + METHODS["qlora-nf4"] + ["run.name=q", "train.steps=1000", "run.log_every=1",
                                                    "run.eval_every=1000", "run.eval_batches=0",
                                                    "checkpoint.every_steps=1000"]
    code, err = _launch_and_terminate(args, tmp_path / "q", after_lines=1)
    assert code == 3, err[-2000:]
    reached = _metrics(tmp_path / "q")[-1]["step"]
    assert sorted(int(p.name) for p in (tmp_path / "q" / "checkpoints").iterdir() if p.name.isdigit()) == [reached]
    assert "trainable params" in err and "optimizer state" in err
