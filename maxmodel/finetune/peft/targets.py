"""Which weights of a built model the peft target names (peft/config.py) mean, shared by LoRA, QLoRA and QAT."""
from __future__ import annotations

from flax import nnx


# target name -> (module class name, weight attribute, input dims of the unstacked weight, its rank)
WEIGHTS = {"q": ("Attention", "wq", 1, 3), "k": ("Attention", "wk", 1, 3), "v": ("Attention", "wv", 1, 3),
           "o": ("Attention", "wo", 2, 3), "gate": ("MLP", "wg", 1, 2), "up": ("MLP", "wi", 1, 2),
           "down": ("MLP", "wo", 1, 2),
           # [E, in, out]: the expert axis leads like a stack's, so each expert gets its own A and B
           "expert_gate": ("MoE", "expert_wg", 1, 2), "expert_up": ("MoE", "expert_wi", 1, 2),
           "expert_down": ("MoE", "expert_wo", 1, 2)}


def axes_of(var) -> tuple:
    axes = var.get_metadata().get("out_sharding")
    return tuple(axes) if axes else (None,) * var[...].ndim


def targets_of(model, names):
    """(module, weight attribute, contract, stacked dims) for every weight the target names match."""
    found = []
    for _, module in nnx.iter_modules(model):
        for name in names:
            cls, attr, contract, rank = WEIGHTS[name]
            if type(module).__name__ == cls and isinstance(getattr(module, attr, None), nnx.Variable):
                found.append((module, attr, contract, getattr(module, attr)[...].ndim - rank))
    return found
