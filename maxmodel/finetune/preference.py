"""The preference losses (objectives reward, dpo, ipo, orpo, simpo, kto), on packed rows of data/preference.py.

A row holds several groups of documents, each document one segment; per-document sums of the per-token
log-probs come from a one-hot over the segment ids ([B, L, D], D = dpo.max_docs), so one forward pass scores
every pair in the row and nothing depends on how rows were packed. In pairwise rows (and KTO's, whose groups
are (example, mismatched example)) group k is segments 2k-1, 2k: the [B, D] sums reshape to [B, D/2, 2].

Definitions (Rafailov et al. 2023; Azar et al. 2023; Hong et al. 2024; Meng et al. 2024; Ethayarajh et al.
2024; as Hugging Face TRL computes them), with pi / ref the policy / reference log-prob of a response, summed
over its tokens, and a bar for the per-token mean:
- dpo:   h = beta [(pi_c - ref_c) - (pi_r - ref_r)];  -(1-eps) log s(h) - eps log s(-h)  (eps: label smoothing)
- ipo:   ((mean-pi_c - mean-ref_c) - (mean-pi_r - mean-ref_r) - 1/(2 beta))^2
- simpo: h = beta (mean-pi_c - mean-pi_r) - gamma;  -(1-eps) log s(h) - eps log s(-h)  (no reference)
- orpo:  -mean-pi_c + lambda * -log s(log odds(c) - log odds(r)),  odds(y) = p / (1 - p), p = exp(mean-pi)
- kto:   z0 = max(0, batch mean of (pi - ref) on mismatched (prompt, response) pairs), no gradient through it
         (the mean over the step's batch, or over each microbatch with train.microbatches > 1, as TRL's per device);
         desirable: lambda_D (1 - s(beta (pi - ref - z0))), undesirable: lambda_U (1 - s(beta (z0 - pi + ref)))
- reward: Plackett-Luce on ranked groups (Bradley-Terry for pairs): -sum_k [r_k - logsumexp_{j >= k} r_j];
          squared error on single scored responses.
Every loss is a sum over units (pairs, examples, groups); the step divides by their count, so the logged loss,
`reward_accuracy` and `reward_margin` are means per unit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from maxmodel.models.score_head import document_onehot, document_scores, token_scores

from .objectives import Objective, token_logps

PREFERENCE_KEYS = ("pref_group", "pref_value")  # data/preference.py's rows
METRICS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")


def doc_sums(values, segment_ids, max_docs: int):
    """[B, L] -> [B, D]: the sum of each document's values."""
    return jnp.einsum("bl,bld->bd", values.astype(jnp.float32), document_onehot(segment_ids, max_docs))


def pairs(x):
    """[B, D] -> ([B, D/2] first, [B, D/2] second) of each two-document group."""
    x = x.reshape(x.shape[0], -1, 2)
    return x[..., 0], x[..., 1]


def _smoothed(h, eps: float):
    return -(1 - eps) * jax.nn.log_sigmoid(h) - eps * jax.nn.log_sigmoid(-h)


def pair_terms(method: str, d, pol, n, ref=None):
    """(per-pair losses, chosen rewards, rejected rewards), each [B, D/2], from per-document policy sums `pol`,
    token counts `n` and reference sums `ref` (None for reference-free methods). The rewards are the
    method's implicit ones, whose order is its preference."""
    mean = pol / jnp.maximum(n, 1.0)
    if method == "dpo":
        (pc, pr), (rc, rr) = pairs(pol), pairs(ref)
        chosen, rejected = d.beta * (pc - rc), d.beta * (pr - rr)
        return _smoothed(chosen - rejected, d.label_smoothing), chosen, rejected
    if method == "ipo":
        ref_mean = ref / jnp.maximum(n, 1.0)
        (pc, pr), (rc, rr) = pairs(mean), pairs(ref_mean)
        chosen, rejected = pc - rc, pr - rr
        return (chosen - rejected - 1 / (2 * d.beta)) ** 2, d.beta * chosen, d.beta * rejected
    pc, pr = pairs(mean)
    chosen, rejected = d.beta * pc, d.beta * pr
    if method == "simpo":
        return _smoothed(chosen - rejected - d.simpo_gamma, d.label_smoothing), chosen, rejected
    if method == "orpo":
        def log_odds(a):  # log p - log(1 - p), with p < 1 kept so the second log stays finite
            a = jnp.minimum(a, -1e-6)
            return a - jnp.log(-jnp.expm1(a))
        return -pc - d.orpo_lambda * jax.nn.log_sigmoid(log_odds(pc) - log_odds(pr)), chosen, rejected
    raise ValueError(method)


def _pair_loss(method: str):
    def loss(model, batch, settings):
        d = settings.cfg.dpo
        seg, D = batch["segment_ids"], d.max_docs
        n = doc_sums(batch["loss_mask"], seg, D)
        pol = doc_sums(token_logps(model, batch, settings.loss_chunk), seg, D)
        ref = doc_sums(batch["ref_logps"], seg, D) if "ref_logps" in batch else None
        losses, chosen, rejected = pair_terms(method, d, pol, n, ref)
        nc, nr = pairs(n)
        valid = ((nc > 0) & (nr > 0)).astype(jnp.float32)
        total = jnp.sum(losses * valid)
        metrics = {"reward_accuracy": jnp.sum(valid * (chosen > rejected)),
                   "reward_margin": jnp.sum(valid * (chosen - rejected)),
                   "chosen_reward": jnp.sum(valid * chosen), "rejected_reward": jnp.sum(valid * rejected)}
        return total, total, jnp.sum(valid), {}, metrics
    return loss


def kto_loss(model, batch, settings):
    d = settings.cfg.dpo
    seg, D = batch["segment_ids"], d.max_docs
    n = doc_sums(batch["loss_mask"], seg, D)
    ratio = doc_sums(token_logps(model, batch, settings.loss_chunk), seg, D) - doc_sums(batch["ref_logps"], seg, D)
    example, mismatched = pairs(ratio)
    (ne, nm), (label, _) = pairs(n), pairs(_doc_values(batch, D))
    valid = ((ne > 0) & (nm > 0)).astype(jnp.float32)
    count = jnp.sum(valid)
    # the reference point: the policy's KL from the reference on responses unrelated to their prompts
    z0 = jax.lax.stop_gradient(jnp.maximum(jnp.sum(valid * mismatched) / jnp.maximum(count, 1.0), 0.0))
    reward = d.beta * (example - z0)
    desirable = label > 0.5
    losses = jnp.where(desirable, d.kto_desirable_weight * (1 - jax.nn.sigmoid(reward)),
                       d.kto_undesirable_weight * (1 - jax.nn.sigmoid(-reward)))
    total = jnp.sum(valid * losses)
    metrics = {"reward_accuracy": jnp.sum(valid * (desirable == (reward > 0))),
               "reward_margin": jnp.sum(valid * jnp.where(desirable, reward, -reward)),
               "chosen_reward": jnp.sum(valid * desirable * reward),
               "rejected_reward": jnp.sum(valid * ~desirable * reward), "kl": z0 * count}
    return total, total, count, {}, metrics


def _doc_values(batch, D):
    """[B, D] each document's `pref_value` (its label or score)."""
    return document_scores(batch["pref_value"], batch["segment_ids"], batch["positions"], D)


def reward_loss(model, batch, settings):
    D = settings.cfg.dpo.max_docs
    seg = batch["segment_ids"]
    pos = batch["positions"]
    score = document_scores(token_scores(model, batch), seg, pos, D)
    group = document_scores(batch["pref_group"].astype(jnp.float32), seg, pos, D)
    present = doc_sums(batch["loss_mask"], seg, D) > 0
    same = (group[:, :, None] == group[:, None, :]) & present[:, :, None] & present[:, None, :]
    size = jnp.sum(same, axis=-1).astype(jnp.float32)
    later = same & (jnp.arange(D)[None, :] >= jnp.arange(D)[:, None])  # e at or after d: rank(e) >= rank(d)
    later = later | jnp.eye(D, dtype=bool)  # absent documents too: no all -inf row (its gradient is NaN)
    # Plackett-Luce: each document against itself and every worse one of its group
    tail = jax.nn.logsumexp(jnp.where(later, score[:, None, :], -jnp.inf), axis=-1)
    ranked = present & (size >= 2)
    pointwise = present & (size == 1)
    error = (score - _doc_values(batch, D)) ** 2
    total = jnp.sum(jnp.where(ranked, tail - score, 0.0)) + jnp.sum(jnp.where(pointwise, error, 0.0))
    count = jnp.sum(jnp.where(present, 1.0 / jnp.maximum(size, 1.0), 0.0))
    ordered = later & ~jnp.eye(D, dtype=bool)  # (better, worse) pairs of a ranked group
    per_group = jnp.where(ordered, 1.0 / jnp.maximum(size * (size - 1) / 2, 1.0)[:, :, None], 0.0)
    diff = score[:, :, None] - score[:, None, :]
    metrics = {"reward_accuracy": jnp.sum(per_group * (diff > 0)), "reward_margin": jnp.sum(per_group * diff),
               "score_error": jnp.sum(jnp.where(pointwise, error, 0.0))}
    return total, total, count, {}, metrics


def reference_preparer(cfg, ts, mesh, data=None):
    """The step's batch plus `ref_logps` [B, L]: the frozen reference's per-token log-probs, computed live
    (finetune/reference.py) or looked up from the one pass over the data of dpo.reference=precomputed."""
    from maxmodel.train.step import global_batch
    if cfg.dpo.reference == "precomputed":
        from .precomputed_reference import PrecomputedReference
        return PrecomputedReference(cfg, ts, mesh)
    from .reference import Reference
    ref = Reference(cfg, ts, mesh)

    def prepare(step, params, local):
        batch = global_batch(local, mesh)
        batch["ref_logps"] = ref(params, batch)
        return batch
    return prepare


def pair_objective(name: str, doc: str) -> Objective:
    with_ref = name in ("dpo", "ipo")
    return Objective(name, _pair_loss(name), formats=("preference",),
                     extra_keys=PREFERENCE_KEYS + (("ref_logps",) if with_ref else ()), doc=doc, metrics=METRICS,
                     prepare=reference_preparer if with_ref else None)
