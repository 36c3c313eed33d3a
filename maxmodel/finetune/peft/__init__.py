"""Parameter-efficient fine-tuning: adapters attached to a built model as their own variable type
(nnx.LoRAParam), so the step can take them apart from the frozen base (train/step.py's SplitStep)."""
from __future__ import annotations

from flax import nnx

from maxmodel.config.schema import PeftConfig

from .config import METHODS  # noqa: F401


def trainable_filter(p: PeftConfig):
    """The nnx filter of what trains: everything in full training, the adapters otherwise (and a new scalar
    head, models/score_head.py, which has no pretrained value to keep: PEFT's modules_to_save)."""
    from maxmodel.models.score_head import HEAD
    return ... if p.method == "none" else nnx.Any(nnx.LoRAParam, nnx.PathContains(HEAD))


def attach(model, cfg, rngs: nnx.Rngs):
    """Adds the method's adapters (and, for qlora, quantizes the base) in place; returns the model."""
    method = cfg.peft.method
    if method == "prompt":
        from .prompt import attach_prompt
        return attach_prompt(model, cfg, rngs)
    if method == "adapter":
        from .adapter import attach_adapters
        return attach_adapters(model, cfg, rngs)
    if method in ("lora", "qlora"):
        from .lora import attach_lora
        model = attach_lora(model, cfg, rngs)
    if method == "qlora":  # after LoRA, which reads the float weights' shapes and shardings
        from .qlora import quantize_base
        model = quantize_base(model, cfg)
    return model
