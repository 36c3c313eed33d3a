"""The planner's per-chip memory model applied to a maxmodel config and mesh, to set beside the figure of the
compiled step (`maxmodel compile`, `maxmodel plan --compile`, benchmarks/aot_memory.py)."""
from __future__ import annotations

from .layout import Layout, layout_memory
from .shape import count_params

TOLERANCE = 0.15  # the estimate must land within this fraction of the compiled step's figure


def config_memory(cfg, mesh_shape: dict, platform: str = "tpu") -> dict:
    """Bytes per chip the planner predicts for training `cfg` on a mesh of `mesh_shape`.

    Attention is taken as flash-like (no saved scores) when the config's kernel resolves to a fused one on
    `platform`: splash on TPU, cuDNN / Pallas flash on GPU."""
    from maxmodel.models.attention_kernels import choose_for_config
    t = cfg.train
    layout = Layout(mesh_shape.get("data", 1), mesh_shape.get("fsdp", 1), mesh_shape.get("tensor", 1),
                    mesh_shape.get("stage", 1), t.remat, max(t.microbatches, 1))
    flash = choose_for_config(cfg, platform) != "xla"
    return layout_memory(layout, cfg.model, count_params(cfg.model)["total"], t.batch_size, t.seq_len,
                         t.param_dtype, t.dtype, cfg.optimizer.name, flash=flash, loss_chunk=t.loss_chunk,
                         sequence_parallel=cfg.mesh.rules == "tp_sp")


def compare(estimate_bytes: float, compiled_bytes: float) -> dict:
    ratio = estimate_bytes / compiled_bytes if compiled_bytes else float("inf")
    return {"estimate_bytes": estimate_bytes, "compiled_bytes": compiled_bytes, "ratio": ratio,
            "within_tolerance": abs(ratio - 1) <= TOLERANCE}


def estimate(cfg, compiled_bytes: float, mesh_shape: dict) -> dict:
    """The planner's per-chip estimate for `cfg` on `mesh_shape`, its parts, and how it compares."""
    parts = config_memory(cfg, mesh_shape)
    return {**compare(parts["total"], compiled_bytes), "parts": parts}
