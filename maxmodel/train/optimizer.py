"""optax optimizers and learning-rate schedules from `optimizer.*`."""
from __future__ import annotations

import jax
import optax

from maxmodel.config.schema import OptimizerConfig


def learning_rate_schedule(opt: OptimizerConfig, steps: int) -> optax.Schedule:
    """Linear warmup, then cosine / linear decay to lr·min_lr_ratio, warmup-stable-decay, or constant."""
    peak, floor = opt.lr, opt.lr * opt.min_lr_ratio
    warmup = min(opt.warmup_steps, steps)
    decay_steps = max(1, (opt.decay_steps or steps) - warmup)
    if opt.schedule == "constant":
        body = optax.constant_schedule(peak)
    elif opt.schedule == "cosine":
        body = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt.min_lr_ratio)
    elif opt.schedule == "linear":
        body = optax.linear_schedule(peak, floor, decay_steps)
    else:  # wsd: hold the peak, then decay linearly over the last decay_fraction of the run
        tail = max(1, round(decay_steps * opt.decay_fraction))
        body = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, floor, tail)],
                                    [decay_steps - tail])
    if warmup == 0:
        return body
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), body], [warmup])


def decay_mask(params) -> dict:
    """Weight decay on matrices only: norm scales and biases (names `scale`, `*bias`) are not decayed."""
    def keep(path, _):
        name = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        return not (name == "scale" or name.endswith("bias"))
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt: OptimizerConfig, steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(opt, steps)
    if opt.name in ("adamw", "adam"):
        wd = opt.weight_decay if opt.name == "adamw" else 0.0
        core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=wd, mask=decay_mask)
    elif opt.name == "lion":
        core = optax.lion(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask)
    elif opt.name == "adafactor":
        core = optax.adafactor(schedule, weight_decay_rate=opt.weight_decay or None, weight_decay_mask=decay_mask)
    else:
        core = optax.chain(optax.add_decayed_weights(opt.weight_decay, decay_mask), optax.sgd(schedule, momentum=opt.b1))
    if opt.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt.clip_norm), core)
    return core
