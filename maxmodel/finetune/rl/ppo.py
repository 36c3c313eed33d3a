"""PPO's Preparer (the classic RLHF pipeline: reward model -> policy gradient with a value head): completions
sampled from the policy, scored by the reward model and / or reward functions; per-token rewards are
-rl.beta · (log π - log π_ref) with the score added at the last token (Ziegler et al. 2019, InstructGPT);
the value head's predictions at rollout time (`old_values`), GAE advantages (whitened over the batch) and
returns go into the batch. The value head is the scalar head of models/score_head.py on the policy's trunk
(model.score_head, on for train.objective=ppo; an exported language model starts with a zero head)."""
from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from maxmodel.models.score_head import token_scores

from .gae import gae, token_rewards, whiten
from .rollout import Rollouts


class PPORollouts(Rollouts):
    def __init__(self, cfg, ts, mesh, data):
        super().__init__(cfg, ts, mesh, data)  # the reference: for the KL penalty in the reward (beta > 0)
        graphdef = ts.graphdef
        self._values = jax.jit(lambda p, b: token_scores(nnx.merge(graphdef, p), b),
                               in_shardings=(ts.param_shardings, None))

    def __call__(self, step, params, local):
        rl = self.cfg.rl
        t0 = time.perf_counter()
        prompts, completions, records = self.sample(step, params, local)
        scores, stats = self.rewards_of(records, completions)
        if np.isnan(scores).any():  # a skipped reward failure: those completions teach nothing
            stats["skipped_completions"] = int(np.isnan(scores).sum())
        rows = self.rows(prompts, completions)
        keep = ~np.isnan(scores)
        rows["loss_mask"] *= keep[:, None]
        batch = self.global_rows(rows)
        ref = self.reference(params, batch) if self.reference is not None else batch["old_logps"]
        values = self._values(params, batch)
        mask, old = rows["loss_mask"], rows["old_logps"]
        # host copies of the global arrays (every process holds all rows: generation ran on all of them)
        ref_np, values_np = (np.asarray(jax.device_get(x)) for x in (ref, values))
        kl = np.where(mask > 0, old - ref_np, 0.0)
        rewards = token_rewards(mask, kl, np.nan_to_num(scores), rl.beta)
        adv, returns = gae(mask, rewards, values_np, rl.gamma, rl.gae_lambda)
        # only the arrays computed from the rollout's forward passes travel to the devices again
        batch.update(self.global_rows({"advantages": whiten(adv, mask).astype(np.float32),
                                       "returns": returns.astype(np.float32),
                                       "old_values": np.where(mask > 0, values_np, 0.0).astype(np.float32)}))
        self.metrics.update(stats, score=float(np.nanmean(scores)), reward_kl=float(kl.sum() / max(mask.sum(), 1)),
                            value_mean=float(values_np[mask > 0].mean()),
                            prepare_seconds=time.perf_counter() - t0)
        self.last_rollout = (prompts, completions, scores, adv)
        return {k: batch[k] for k in (*rows, "returns", "old_values")}
