"""The loss guard as an optax transformation: non-finite and spiking steps leave the state untouched."""
import jax.numpy as jnp
import numpy as np
import optax

from maxmodel.config.schema import TrainConfig
from maxmodel.train.guards import guarded, resumed


def run(losses, cfg, bad_grad_steps=()):
    tx = guarded(optax.adam(0.1), cfg)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    history = []
    for i, loss in enumerate(losses):
        grads = {"w": jnp.full(3, jnp.nan if i in bad_grad_steps else 0.5)}
        updates, state = tx.update(grads, state, params, loss=jnp.float32(loss))
        params = optax.apply_updates(params, updates)
        history.append(np.asarray(params["w"]).copy())
    return history, state


def test_nonfinite_loss_or_grads_skip_and_count():
    history, state = run([1.0, np.nan, 1.0, 1.0], TrainConfig(), bad_grad_steps=(3,))
    np.testing.assert_array_equal(history[1], history[0])  # NaN loss: no update
    np.testing.assert_array_equal(history[3], history[2])  # NaN gradient: no update
    assert not np.array_equal(history[2], history[1])      # a good step updates
    assert int(state.skipped) == 2 and int(state.bad_step) == 2 and not bool(state.halted)
    assert int(state.inner[0].count) == 2                  # Adam's step count saw only the good steps


def test_stop_mode_halts_every_later_update_until_resumed():
    history, state = run([1.0, np.inf, 1.0, 1.0], TrainConfig(on_nonfinite="stop"))
    assert bool(state.halted) and int(state.bad_step) == 2
    for h in history[1:]:
        np.testing.assert_array_equal(h, history[0])
    state = resumed(state)
    assert not bool(state.halted) and int(state.bad_step) == 0 and int(state.skipped) == 1


def test_spike_detector_skips_losses_far_above_the_running_mean():
    cfg = TrainConfig(spike_sigma=4.0, spike_warmup=5, spike_decay=0.9)
    losses = [2.0, 2.1, 1.9, 2.05, 1.95, 2.0, 9.0, 2.0]
    history, state = run(losses, cfg)
    np.testing.assert_array_equal(history[6], history[5])  # the 9.0 spike is not applied
    assert not np.array_equal(history[7], history[6])
    assert int(state.spikes) == 1 and int(state.skipped) == 0
    assert abs(float(state.loss_mean) - 2.0) < 1.0         # statistics absorbed it, damped
    # Before the warmup the detector never fires, even on a large jump.
    _, early = run([2.0, 9.0], cfg)
    assert int(early.spikes) == 0
