"""Loss guards inside the compiled step: skip updates whose loss or gradients are not finite, or whose loss
spikes far above its running mean, without a host round trip per step.

The guard is an optax transformation wrapped around the optimizer. Its state (counters and the running loss
statistics) is part of the optimizer state, so it is checkpointed, restored and resharded with it. A skipped
update leaves parameters and inner optimizer state exactly as they were, like `optax.apply_if_finite`, and
also looks at the loss, which the step passes as an extra argument (`tx.update(..., loss=loss)`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from maxmodel.config.schema import TrainConfig


class NonFiniteStop(Exception):
    """`train.on_nonfinite=stop` saw a non-finite loss or gradient; the last good state is checkpointed."""


class GuardState(NamedTuple):
    inner: Any                # the wrapped optimizer's state
    skipped: jax.Array        # updates skipped because the loss or a gradient was not finite
    spikes: jax.Array         # updates skipped as loss spikes
    halted: jax.Array         # `stop` mode: a non-finite step happened; every later update is skipped
    bad_step: jax.Array       # the first non-finite step (1-based) since the run (re)started, 0 = none
    steps: jax.Array          # updates attempted
    loss_mean: jax.Array      # exponentially weighted mean of finite losses
    loss_var: jax.Array       # and their exponentially weighted variance
    seen: jax.Array           # finite losses folded into those statistics


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guarded(inner: optax.GradientTransformation, cfg: TrainConfig) -> optax.GradientTransformationExtraArgs:
    stop_mode = cfg.on_nonfinite == "stop"
    sigma, warmup, decay = cfg.spike_sigma, cfg.spike_warmup, cfg.spike_decay

    def init(params):
        i32, f32 = jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32)
        return GuardState(inner.init(params), i32, i32, jnp.zeros([], bool), i32, i32, f32, f32, i32)

    def update(grads, state: GuardState, params=None, *, loss, **_):
        loss = loss.astype(jnp.float32)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        if sigma > 0:
            threshold = state.loss_mean + sigma * jnp.sqrt(state.loss_var)
            spike = finite & (state.seen >= warmup) & (loss > threshold)
        else:
            spike = jnp.array(False)
        halted = state.halted | (~finite & stop_mode)
        ok = finite & ~spike & ~halted

        new_updates, new_inner = inner.update(grads, state.inner, params)
        # jnp.where never lets the unused branch's NaN through: a skipped update is exactly zero.
        updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
        inner_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_inner, state.inner)

        # Running statistics over every finite loss, spikes included, so a lasting shift in the loss level
        # is absorbed after about 1/(1-decay) steps instead of freezing training. The first losses get a
        # plain average (alpha = 1/n) so the mean does not start biased towards zero.
        alpha = jnp.maximum(1.0 - decay, 1.0 / (state.seen + 1).astype(jnp.float32))
        delta = loss - state.loss_mean
        mean = jnp.where(finite, state.loss_mean + alpha * delta, state.loss_mean)
        var = jnp.where(finite, (1.0 - alpha) * (state.loss_var + alpha * delta * delta), state.loss_var)

        steps = state.steps + 1
        new_state = GuardState(
            inner=inner_state,
            skipped=state.skipped + (~finite).astype(jnp.int32),
            spikes=state.spikes + spike.astype(jnp.int32),
            halted=halted,
            bad_step=jnp.where((state.bad_step == 0) & ~finite, steps, state.bad_step),
            steps=steps, loss_mean=mean, loss_var=var, seen=state.seen + finite.astype(jnp.int32))
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)


def metrics(state: GuardState) -> dict:
    """Device scalars for the step's metrics (fetched by the host only when it logs)."""
    return {"skipped_steps": state.skipped, "spike_skips": state.spikes, "halted": state.halted,
            "bad_step": state.bad_step}


def halted(metrics_: dict, cfg: TrainConfig) -> bool:
    """Whether `stop` mode has seen a non-finite step. A host sync, so the loop asks only when it syncs anyway
    (logging, saving); updates after the bad step are skipped meanwhile, so the state stays the last good one."""
    return cfg.on_nonfinite == "stop" and bool(jax.device_get(metrics_["halted"]))


def stop_error(metrics_: dict, step: int, saved: bool) -> NonFiniteStop:
    bad = int(jax.device_get(metrics_["bad_step"]))
    return NonFiniteStop(f"non-finite loss or gradients at step {bad}; updates from then on were skipped; "
                         + (f"the last good state is saved as step {step}" if saved else
                            "checkpointing is off: nothing saved"))


def resumed(state: GuardState) -> GuardState:
    """After a restore: counters and loss statistics carry on, a `stop` halt does not (the user chose to go on)."""
    return state._replace(halted=state.halted & False, bad_step=state.bad_step * 0)  # keeps shardings
