"""Device mesh from `mesh.*`: within-slice (ICI) sizes and across-slice (DCN) sizes, -1 fills the rest."""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils

from maxmodel.config.errors import ConfigError
from maxmodel.config.schema import MeshAxes, MeshConfig

from .rules import MESH_AXES, resolve_preset


def _fill(sizes: dict[str, int], total: int, prefix: str) -> dict[str, int]:
    """Replace the one -1 entry so the product equals `total`; name the axis and numbers on mismatch."""
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ConfigError(f"{prefix}.{free[1]}", f"only one axis may be -1, got {', '.join(free)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if total % fixed:
            raise ConfigError(f"{prefix}.{free[0]}", f"{total} devices are not divisible by the other axes' "
                                                     f"product {fixed}")
        sizes = {**sizes, free[0]: total // fixed}
    if math.prod(sizes.values()) != total:
        desc = " × ".join(f"{a}={s}" for a, s in sizes.items() if s != 1) or "all axes 1"
        raise ConfigError(prefix, f"{desc} = {math.prod(sizes.values())} does not match {total} devices")
    return sizes


def mesh_shape(cfg: MeshConfig, num_devices: int, num_slices: int = 1) -> tuple[dict[str, int], dict[str, int]]:
    """(ICI sizes, DCN sizes) per axis, in MESH_AXES order."""
    dcn = _fill({a: getattr(cfg.dcn, a) for a in MESH_AXES}, num_slices, "mesh.dcn")
    ici = _fill({a: getattr(cfg, a) for a in MESH_AXES}, num_devices // num_slices, "mesh")
    return ici, dcn


def build_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all) with compiler-propagated (Auto) axes."""
    devices = list(jax.devices() if devices is None else devices)
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    ici, dcn = mesh_shape(cfg, len(devices), len(slices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len(slices) > 1:
        grid = mesh_utils.create_hybrid_device_mesh(tuple(ici.values()), tuple(dcn.values()), devices)
    else:
        shape = tuple(ici[a] * dcn[a] for a in MESH_AXES)
        try:
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.array(devices).reshape(shape)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


def platform() -> str:
    """The platform the program is being compiled for: the mesh's devices (TPU in an ahead-of-time compile
    on a CPU host), else the default backend. Kernel choices (attention, grouped matmul) key on this."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh.abstract_device.platform
    return jax.default_backend()


def single_device_mesh_config() -> MeshConfig:
    return MeshConfig(data=1, dcn=MeshAxes())


ZERO_BUBBLE = "zero_bubble"  # 1F1B with split backward steps (schedules.make_schedule(split_backward=True))
ONE_F_ONE_B = ("1f1b", "interleaved_1f1b", ZERO_BUBBLE)
# the objectives whose loss is a per-token sum over rows, which 1F1B computes microbatch by microbatch
ONE_F_ONE_B_OBJECTIVES = ("causal_lm", "sft")


def check_schedule(cfg) -> None:
    pipe = cfg.pipeline
    if pipe.schedule in ("circular", "interleaved_1f1b") and pipe.repeats < 2:
        raise ConfigError("pipeline.repeats", f"pipeline.schedule={pipe.schedule} needs repeats >= 2 chunks per "
                                              f"device, got {pipe.repeats}")
    if pipe.schedule in ("1f1b", ZERO_BUBBLE) and pipe.repeats > 1:
        raise ConfigError("pipeline.repeats", f"pipeline.schedule={pipe.schedule} has one chunk per device: use "
                                              "interleaved_1f1b for repeats > 1")
    if pipe.schedule not in ONE_F_ONE_B:
        return
    if cfg.train.objective not in ONE_F_ONE_B_OBJECTIVES:
        raise ConfigError("pipeline.schedule", f"{pipe.schedule} computes the loss inside the pipeline for "
                                               f"{', '.join(ONE_F_ONE_B_OBJECTIVES)}, not train.objective="
                                               f"{cfg.train.objective}: use gpipe")
    if cfg.peft.method == "prompt":
        raise ConfigError("pipeline.schedule", f"{pipe.schedule} does not place soft prompts: use gpipe")
    if cfg.mesh.sequence > 1:
        raise ConfigError("pipeline.schedule", f"{pipe.schedule} runs with whole sequences per stage: use gpipe "
                                               f"with mesh.sequence > 1")


def check_layout(cfg, mesh_shape: dict[str, int]) -> None:
    """Shapes that a layout must divide, checked before compiling so the error names the key and numbers."""
    m, t = cfg.model, cfg.train
    tensor, seq, stage = mesh_shape["tensor"], mesh_shape["sequence"], mesh_shape["stage"]
    batch_shards = mesh_shape["data"] * mesh_shape["fsdp"] * mesh_shape["expert"]
    checks = [
        ("model.num_heads", m.num_heads, tensor, "mesh.tensor"),
        ("model.num_kv_heads", m.num_kv_heads, tensor, "mesh.tensor"),
        ("model.d_ff", m.d_ff, tensor, "mesh.tensor"),
        ("model.vocab_size", m.vocab_size, tensor, "mesh.tensor"),
        ("train.seq_len", t.seq_len, seq, "mesh.sequence"),
        ("model.num_layers", m.num_layers, stage, "mesh.stage"),
        ("train.batch_size", t.batch_size // t.microbatches, batch_shards,
         "the batch axes data × fsdp × expert (per microbatch)"),
    ]
    if m.moe.num_experts:
        checks += [("model.moe.num_experts", m.moe.num_experts, mesh_shape["expert"], "mesh.expert"),
                   ("model.moe.d_ff", m.moe.d_ff, tensor, "mesh.tensor")]
        if stage > 1 and m.moe.first_dense_layers:
            raise ConfigError("model.moe.first_dense_layers", f"pipeline stages hold the repeated MoE units only: "
                                                              f"set it to 0 with mesh.stage={stage}")
        units = m.num_layers // max(1, m.moe.every)
        if stage > 1 and units % (stage * cfg.pipeline.repeats):
            raise ConfigError("model.num_layers", f"{m.num_layers} layers in MoE units of model.moe.every="
                                                  f"{m.moe.every} make {units} units, not divisible by mesh.stage "
                                                  f"× pipeline.repeats={stage * cfg.pipeline.repeats}")
        if stage > 1 and seq > 1:
            raise ConfigError("mesh.sequence", "MoE layers inside pipeline stages run with whole sequences: use "
                                               "mesh.sequence=1 with mesh.stage > 1")
        if stage > 1 and m.moe.impl == "megablox":  # grouped_matmul.choose refuses it there too
            raise ConfigError("model.moe.impl", f"megablox is not supported inside pipeline stages (mesh."
                                                f"stage={stage}): a Mosaic kernel needs every mesh axis "
                                                f"manual; use auto or ragged_dot")
    if m.arch == "encoder_decoder" and (stage > 1 or seq > 1):  # a -1 axis may have filled to > 1
        key = "mesh.stage" if stage > 1 else "mesh.sequence"
        raise ConfigError(key, f"model.arch=encoder_decoder does not support {key} > 1 (got {stage if stage > 1 else seq})")
    if stage > 1:
        pipe = cfg.pipeline
        micro = pipe.microbatches or stage
        checks[5] = ("model.num_layers", m.num_layers, stage * pipe.repeats, "mesh.stage × pipeline.repeats")
        checks.append(("train.batch_size", t.batch_size // t.microbatches, micro * batch_shards,
                       "pipeline.microbatches × the batch axes"))
        if micro < stage:
            raise ConfigError("pipeline.microbatches", f"{micro} is fewer than mesh.stage={stage} stages")
        # mesh.rules=auto (the default) is the pipeline table here; only an explicit other table contradicts
        if resolve_preset(cfg.mesh.rules, stage) != "pipeline" and \
                dict(cfg.mesh.rule_overrides).get("layers") != "stage":
            raise ConfigError("mesh.rules", f"mesh.rules={cfg.mesh.rules} does not put the layers on the stage "
                                            f"axis, which mesh.stage={stage} needs: leave mesh.rules unset (auto), "
                                            f"set mesh.rules=pipeline, or mesh.rule_overrides.layers=stage")
        if not cfg.train.scan_layers:
            raise ConfigError("train.scan_layers", "pipeline parallelism needs the stacked (scanned) layers")
        check_schedule(cfg)
    for key, value, size, axis in checks:
        if size > 1 and value % size:
            raise ConfigError(key, f"{key.split('.')[-1]}={value} is not divisible by {axis}={size}")
