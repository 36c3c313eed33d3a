"""PPO for language models (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022): the clipped
surrogate on per-token GAE advantages (the same surrogate as GRPO's, rl.epsilon / rl.epsilon_high) plus
rl.value_coef × the clipped value loss ½·max((V - R)², (clip(V, V_old ± rl.value_clip) - R)²) of the value
head sharing the policy's trunk. The KL to the reference is in the reward (rl/ppo.py), not in the loss. The
batch comes from rl/ppo.py; rl.loss_agg aggregates as for GRPO."""
import jax
import jax.numpy as jnp

from .base import Objective
from .grpo import clipped_surrogate, token_weights

KEYS = ("old_logps", "advantages", "returns", "old_values")
METRICS = ("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction")


def loss(model, batch, settings):
    rl = settings.cfg.rl
    mask = batch["loss_mask"].astype(jnp.float32)
    h, _ = model.hidden(batch["inputs"], batch["segment_ids"], batch["positions"])
    logp = jax.nn.log_softmax(model.logits(h).astype(jnp.float32), axis=-1)
    logp = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    values = model.score_head(h)
    pg, _, binds = clipped_surrogate(logp, batch["old_logps"], batch["advantages"], rl.epsilon,
                                     rl.epsilon_high or rl.epsilon)
    old_v, returns = batch["old_values"], batch["returns"]
    clipped_v = old_v + jnp.clip(values - old_v, -rl.value_clip, rl.value_clip)
    vf = 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(clipped_v - returns))
    w, count = token_weights(mask, rl.loss_agg, rl.max_new_tokens)
    total = jnp.sum(w * (pg + rl.value_coef * vf))
    v_binds = jnp.square(clipped_v - returns) > jnp.square(values - returns)
    return total, total, count, {}, {"policy_loss": jnp.sum(w * pg), "value_loss": jnp.sum(w * vf),
                                     "clip_fraction": jnp.sum(w * binds), "value_clip_fraction": jnp.sum(w * v_binds)}


def _prepare(cfg, ts, mesh, data):
    from maxmodel.finetune.rl.ppo import PPORollouts
    return PPORollouts(cfg, ts, mesh, data)


OBJECTIVE = Objective("ppo", loss, archs=("decoder",), extra_keys=KEYS, formats=("prompt",), metrics=METRICS,
                      prepare=_prepare)
