"""Every parallel layout trains exactly like one device: loss and global grad norm over 3 steps, float32."""
import jax
import numpy as np
import pytest
from test_train_step import run_steps

# 4 layers (divisible by 4 stages), 8 query / 4 kv heads (GQA, divisible by tensor=4).
MODEL = ["model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=4"]
LAYOUTS = {
    "data=8": ["mesh.data=8"],
    "fsdp=8": ["mesh.data=1", "mesh.fsdp=8", "mesh.rules=fsdp"],
    "data=8 zero1": ["mesh.data=8", "mesh.zero1=true"],
    "tensor=4 x data=2": ["mesh.data=2", "mesh.tensor=4"],
    "sequence=4 allgather": ["mesh.data=2", "mesh.sequence=4", "model.attention.context_parallel=allgather"],
    "sequence=4 ring": ["mesh.data=2", "mesh.sequence=4", "model.attention.context_parallel=ring"],
    "stage=4 gpipe": ["mesh.data=2", "mesh.stage=4", "pipeline.microbatches=4"],
    "stage=2 circular repeats=2": ["mesh.data=4", "mesh.stage=2", "pipeline.microbatches=2", "pipeline.repeats=2"],
    "stage=4 1f1b": ["mesh.data=2", "mesh.stage=4", "pipeline.microbatches=4", "pipeline.schedule=1f1b"],
    "stage=4 zero_bubble": ["mesh.data=2", "mesh.stage=4", "pipeline.microbatches=4",
                            "pipeline.schedule=zero_bubble"],
    "stage=2 interleaved 1f1b x data=4": ["mesh.data=4", "mesh.stage=2", "pipeline.microbatches=2",
                                          "pipeline.repeats=2", "pipeline.schedule=interleaved_1f1b"],
    "stage=2 1f1b x fsdp=2 x tensor=2": ["mesh.data=1", "mesh.stage=2", "mesh.fsdp=2", "mesh.tensor=2",
                                         "pipeline.microbatches=4", "pipeline.schedule=1f1b"],
    "stage=2 zero_bubble x fsdp=2 x tensor=2": ["mesh.data=1", "mesh.stage=2", "mesh.fsdp=2", "mesh.tensor=2",
                                                "pipeline.microbatches=4", "pipeline.schedule=zero_bubble"],
    "stage=2 interleaved 1f1b x fsdp=2 x tensor=2": [
        "mesh.data=1", "mesh.stage=2", "mesh.fsdp=2", "mesh.tensor=2", "pipeline.microbatches=2",
        "pipeline.repeats=2", "pipeline.schedule=interleaved_1f1b"],
    "data=2 x fsdp=2 x tensor=2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    "stage=2 x fsdp=2 x tensor=2": ["mesh.data=1", "mesh.stage=2", "mesh.fsdp=2", "mesh.tensor=2",
                                    "pipeline.microbatches=2"],
}


@pytest.fixture(scope="module")
def single_device():
    return run_steps(MODEL + ["mesh.data=1"], jax.devices()[:1])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_equals_single_device(layout, single_device):
    result = run_steps(MODEL + LAYOUTS[layout], jax.devices())
    np.testing.assert_allclose(result, single_device, rtol=1e-5)
