"""Every parallel layout trains exactly like one device: loss and global grad norm over 3 steps, float32."""
import contextlib

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


@contextlib.contextmanager
def private_compile_cache(directory):
    from jax.experimental.compilation_cache import compilation_cache
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(directory))
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_equals_single_device(layout, single_device, tmp_path):
    if "zero_bubble" not in layout:
        result = run_steps(MODEL + LAYOUTS[layout], jax.devices())
    else:  # its step must not come back from the persistent cache (a loaded copy can deadlock on CPU)
        with private_compile_cache(tmp_path):
            result = run_steps(MODEL + LAYOUTS[layout], jax.devices())
        written = [p.name for p in tmp_path.iterdir()]
        assert any(n.startswith("jit_init") for n in written), written  # the cache was in use
        assert not any(n.startswith("jit_step") for n in written), written
    np.testing.assert_allclose(result, single_device, rtol=1e-5)
