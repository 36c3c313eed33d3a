"""The interface every objective implements, and the token-level language-model loss most of them share."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from maxmodel.train.chunked_loss import chunked_token_logps, fused_cross_entropy
from maxmodel.train.loss import cross_entropy_sums

# Every batch holds these [batch, seq_len] arrays; an objective names the extra ones it needs.
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
# Soft prompts' placement (finetune/peft/prompt.py): passed to the model whenever a batch has them.
PROMPT_KEYS = ("task", "prompt_slots")


def with_prompt(batch: dict, model_kwargs: dict) -> dict:
    return {**model_kwargs, **{k: batch[k] for k in PROMPT_KEYS if k in batch}}


@dataclass(frozen=True)
class LossSettings:
    """What the step decides for every objective: the z-loss weight and the fused head's chunk (0 = off);
    `cfg`, the run's Config, where an objective reads its method settings (rl.*, dpo.*, distill.*);
    `gradients`: the loss is being differentiated (the train step), so a 1F1B pipeline may compute it
    together with its gradients (evaluation runs the forward-only GPipe path instead)."""
    z_loss: float = 0.0
    loss_chunk: int = 0
    cfg: Any = field(default=None, compare=False)
    gradients: bool = False


@dataclass(frozen=True)
class Objective:
    """name: the `train.objective` value. extra_keys: batch keys beyond BATCH_KEYS. archs: the `model.arch`
    values it trains. formats: the `data.format` values it accepts (None: any). loss(model, batch, settings)
    -> (summed objective, summed nll, counted tokens, model stats, extra summed metrics): sums, not means,
    so microbatches add up to the full batch and the step divides once by the total count (the extra metrics,
    named in `metrics`, too: they are logged as means per counted unit; a preference loss counts pairs)."""
    name: str
    loss: Callable[..., tuple]
    archs: tuple[str, ...] = ("decoder",)
    extra_keys: tuple[str, ...] = ()
    formats: tuple[str, ...] | None = None
    doc: str = ""
    metrics: tuple[str, ...] = field(default_factory=tuple)
    # (cfg, train_step, mesh, train_data) -> a Preparer: the host work that turns the data pipeline's local rows into the
    # step's global batch (reference log-probs, rollouts, rewards). None: the rows go to the step as they are.
    prepare: Callable | None = None


def token_logps(model, batch: dict, chunk: int = 0, **model_kwargs: Any):
    """log p(target) at every position [B, L] in float32, 0 where `loss_mask` is 0: the per-token log-probs
    preference and RL objectives sum per sequence, and that a sampler's log-probs are checked against. With
    `chunk` (the step's LossSettings.loss_chunk) the head runs over chunks of positions: no [B, L, V] logits."""
    model_kwargs = with_prompt(batch, model_kwargs)
    if chunk:
        h, _ = model.hidden(batch["inputs"], batch["segment_ids"], batch["positions"], **model_kwargs)
        return chunked_token_logps(h, model.head_matrix(), batch["targets"], batch["loss_mask"], chunk)
    logits = model(batch["inputs"], batch["segment_ids"], batch["positions"], **model_kwargs).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.where(batch["loss_mask"] > 0, picked, 0.0)


def lm_loss(model, batch: dict, s: LossSettings, **model_kwargs: Any):
    """Next-token (or, for masked_lm, masked-token) cross-entropy on `loss_mask`, with the optional z-loss.
    With a loss chunk the head and the loss are fused over chunks of positions (no [B, L, V] logits). A batch
    with `task` (and `prompt_slots`) arrays places each row's soft prompts (peft.method=prompt)."""
    model_kwargs = with_prompt(batch, model_kwargs)
    if s.gradients and not model_kwargs and getattr(model, "one_f_one_b", lambda: False)():
        def loss_fn(logits, inputs):
            nll, z, count = cross_entropy_sums(logits, inputs["targets"], inputs["loss_mask"], s.z_loss, one_hot=True)
            return nll + z, {"nll": nll, "count": count}
        count = batch["loss_mask"].astype(jnp.float32).sum()
        total, sums, stats = model.pipelined_loss(batch["inputs"], batch["segment_ids"], batch["positions"],
                                                  loss_fn, {k: batch[k] for k in ("targets", "loss_mask")}, count)
        return total, sums["nll"], sums["count"], stats, {}
    if s.loss_chunk:
        mask = batch["loss_mask"].astype(jnp.float32)
        h, stats = model.hidden(batch["inputs"], batch["segment_ids"], batch["positions"], **model_kwargs)
        total, nll = fused_cross_entropy(h, model.head_matrix(), batch["targets"], mask, s.z_loss, s.loss_chunk)
        count = mask.sum()
    else:
        logits, stats = model(batch["inputs"], batch["segment_ids"], batch["positions"], return_stats=True,
                              **model_kwargs)
        nll, z, count = cross_entropy_sums(logits, batch["targets"], batch["loss_mask"], s.z_loss)
        total = nll + z
    return total, nll, count, stats, {}
