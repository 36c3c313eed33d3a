"""What a run holds: trainable / total parameter counts and the bytes of parameters, gradients and optimizer
state, from the abstract state (shapes and dtypes; nothing allocated). Logged at the start of every run and
shown by `maxmodel config show`, so a peft method's saving is visible before anything compiles."""
from __future__ import annotations

import math

import jax
from flax import nnx


def _size_bytes(tree) -> tuple[int, int]:
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]
    return (sum(math.prod(x.shape) for x in leaves),
            sum(math.prod(x.shape) * jax.numpy.dtype(x.dtype).itemsize for x in leaves))


def state_report(abstract_params, trainable_filter, abstract_opt) -> dict[str, int]:
    """Counts are stored elements (a quantized base counts its codes and scales as stored). Gradients exist
    for the trainable part alone (train/step.py differentiates nothing else), in its dtypes. LoRA dropout
    seeds are state, not parameters: in the bytes, not the counts."""
    from maxmodel.finetune.peft.lora import DropoutSeed
    seeds, params = nnx.split_state(abstract_params, DropoutSeed, ...)
    trainable, frozen = nnx.split_state(params, trainable_filter, ...)
    n_train, b_train = _size_bytes(trainable)
    n_frozen, b_frozen = _size_bytes(frozen)
    b_frozen += _size_bytes(seeds)[1]
    _, b_opt = _size_bytes(abstract_opt)
    return {"trainable_params": n_train, "total_params": n_train + n_frozen, "param_bytes": b_train + b_frozen,
            "frozen_bytes": b_frozen, "grad_bytes": b_train, "opt_state_bytes": b_opt,
            "state_bytes": b_train + b_frozen + b_train + b_opt}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def describe(r: dict[str, int]) -> str:
    share = r["trainable_params"] / max(r["total_params"], 1)
    return (f"trainable params {r['trainable_params']:,} of {r['total_params']:,} ({share:.2%}); "
            f"params {_mib(r['param_bytes'])} (frozen {_mib(r['frozen_bytes'])}), grads {_mib(r['grad_bytes'])}, "
            f"optimizer state {_mib(r['opt_state_bytes'])}")


def report_for(cfg) -> dict[str, int]:
    """The report of a config on one host device (the optimizer's state shapes do not depend on the mesh)."""
    from maxmodel.finetune import peft
    from maxmodel.models.registry import build_model

    from . import guards
    from .optimizer import make_optimizer
    with nnx.use_eager_sharding(False):
        abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))))[1]
    filt = peft.trainable_filter(cfg.peft)
    tx = guards.guarded(make_optimizer(cfg.optimizer, cfg.train.steps), cfg.train)
    opt = jax.eval_shape(tx.init, nnx.split_state(abstract, filt, ...)[0])
    return state_report(abstract, filt, opt)
