"""Logical-axis rules: data that maps the model's logical axis names to mesh axes.

Model code only names logical axes; `mesh.rules=<preset>` picks a table here and `mesh.rule_overrides`
replaces single entries, so changing the layout is a config change. The default, `auto`, is `pipeline` on a
mesh with pipeline stages and `default` otherwise: asking for `mesh.stage=N` is enough (as MaxText's
ici_pipeline_parallelism), while an explicitly chosen table still wins. Mesh axes, slow to fast:
data, stage, fsdp, sequence, tensor, expert.
"""
from __future__ import annotations

from typing import Any

from maxmodel.config.errors import ConfigError

MESH_AXES = ("data", "stage", "fsdp", "sequence", "tensor", "expert")

# Every logical name used by the model. A name missing from a rule table maps to None (replicated).
LOGICAL_AXES = (
    # parameters
    "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", "layers", "exp", "exp_mlp",
    # activations
    "activation_batch", "activation_length", "activation_embed", "activation_heads", "activation_kv_heads",
    "activation_head_dim", "activation_mlp", "activation_vocab", "activation_exp",
)

# Weights are sharded over fsdp along `embed` (gathered per layer by the compiler) and Megatron-style over
# tensor along heads / mlp / vocab; the batch is split over data and fsdp.
_FSDP_TP = {
    "vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
    "exp": "expert", "exp_mlp": "tensor",
    "activation_batch": ("data", "fsdp", "expert"), "activation_length": "sequence",
    "activation_heads": "tensor", "activation_kv_heads": "tensor", "activation_mlp": "tensor",
    "activation_vocab": "tensor", "activation_exp": "expert",
}

PRESETS: dict[str, dict[str, Any]] = {
    "default": _FSDP_TP,
    "fsdp_tp": _FSDP_TP,
    # Pure FSDP: parameters sharded over fsdp only, tensor axis unused for weights.
    "fsdp": {**_FSDP_TP, "vocab": None, "heads": None, "kv_heads": None, "mlp": None, "exp_mlp": None,
             "activation_heads": None, "activation_kv_heads": None, "activation_mlp": None,
             "activation_vocab": None},
    # Megatron sequence parallelism: activations between blocks are split along the sequence over tensor.
    "tp_sp": {**_FSDP_TP, "activation_length": ("sequence", "tensor")},
    # Pipeline: the stacked-layer axis is split over stage.
    "pipeline": {**_FSDP_TP, "layers": "stage"},
}


def _check_target(name: str, target: Any) -> Any:
    targets = target if isinstance(target, (tuple, list)) else (target,)
    for t in targets:
        if t is not None and t not in MESH_AXES:
            raise ConfigError(f"mesh.rule_overrides.{name}", f"'{t}' is not a mesh axis ({', '.join(MESH_AXES)})")
    return tuple(target) if isinstance(target, list) else target


AUTO = "auto"


def resolve_preset(preset: str, stages: int) -> str:
    """The table `mesh.rules` names on a mesh with `stages` pipeline stages (`auto` is resolved here only)."""
    if preset == AUTO:
        return "pipeline" if stages > 1 else "default"
    if preset not in PRESETS:
        raise ConfigError("mesh.rules", f"unknown preset '{preset}'; choose one of {AUTO}, {', '.join(PRESETS)}")
    return preset


def logical_rules(preset: str = AUTO, overrides: dict[str, Any] | None = None,
                  stages: int = 1) -> tuple[tuple[str, Any], ...]:
    """The rule table as flax expects it: ((logical_name, mesh_axis_or_tuple_or_None), ...)."""
    preset = resolve_preset(preset, stages)
    table = dict(PRESETS[preset])
    for name, target in (overrides or {}).items():
        if name not in LOGICAL_AXES:
            raise ConfigError(f"mesh.rule_overrides.{name}", f"unknown logical axis; valid: {', '.join(LOGICAL_AXES)}")
        table[name] = _check_target(name, target)
    return tuple((name, table.get(name)) for name in LOGICAL_AXES)


def mesh_rules(mesh_cfg, mesh) -> tuple[tuple[str, Any], ...]:
    """The rules `mesh.*` asks for on the built `mesh` (whose stage size resolves `auto`)."""
    return logical_rules(mesh_cfg.rules, mesh_cfg.rule_overrides, dict(mesh.shape).get("stage", 1))
