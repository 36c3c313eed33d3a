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


def merged_params(cfg, params):
    """The parameter state with every adapter folded into its weight, shaped like a peft.method=none model's
    (jitted where the shards are: nothing gathers on one device). Call under the run's mesh + rules."""
    import dataclasses

    import jax

    from maxmodel.train.step import abstract_state

    from .lora import merge
    graphdef, _ = abstract_state(cfg)
    _, base = abstract_state(dataclasses.replace(cfg, peft=dataclasses.replace(cfg.peft, method="none")))

    def fold(state):
        return nnx.split(merge(nnx.merge(graphdef, state)))[1]
    return jax.jit(fold, out_shardings=jax.tree.map(lambda x: x.sharding, base))(params)


def from_base(cfg, directory: str, param_shardings):
    """A new peft run's parameters over an exported base model (init.from): the base restored with a
    peft.method=none model's shapes and shardings, then the method's adapters attached (and, for qlora, the
    base quantized) inside jit, each array created where its shards are. Call under the run's mesh + rules."""
    import dataclasses

    import jax

    from maxmodel.train.checkpoint import abstract_like
    from maxmodel.train.export import load_params
    from maxmodel.train.step import abstract_state, concrete_shardings
    base_cfg = dataclasses.replace(cfg, peft=dataclasses.replace(cfg.peft, method="none"))
    graphdef, abstract = abstract_state(base_cfg)
    mesh = jax.tree.leaves(param_shardings)[0].mesh
    base = load_params(directory, abstract_like(abstract, concrete_shardings(abstract, mesh)))

    def build(base):
        return nnx.split(attach(nnx.merge(graphdef, base), cfg, nnx.Rngs(cfg.train.seed + 1)))[1]
    return jax.jit(build, out_shardings=param_shardings)(base)
