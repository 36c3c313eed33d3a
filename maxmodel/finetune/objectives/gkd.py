"""On-policy distillation (GKD, Agarwal et al. 2024): the student samples completions of the prompts (the
generation engine, with its current weights: rl.* sampling settings), the teacher scores every token of
them, and the student minimises a divergence between the two next-token distributions at each completion
position: the generalized Jensen-Shannon divergence with distill.beta (0: forward KL(teacher || student),
1: reverse KL(student || teacher), mode-seeking, the default; in between, both against the mixture
beta·p_teacher + (1-beta)·p_student, as TRL's GKD defines it). Training on its own samples removes the
train / generate mismatch of distilling on fixed text. Logged: the divergence per completion token."""
import jax
import jax.numpy as jnp

from .base import Objective


def generalized_jsd(teacher_logits, student_logits, beta: float):
    """Per-position divergence [B, L] between the teacher's and the student's distributions."""
    t = jax.nn.log_softmax(teacher_logits, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    if beta == 0.0:
        return jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    if beta == 1.0:
        return jnp.sum(jnp.exp(s) * (s - t), axis=-1)
    m = jnp.logaddexp(t + jnp.log(beta), s + jnp.log1p(-beta))
    return beta * jnp.sum(jnp.exp(t) * (t - m), axis=-1) + (1 - beta) * jnp.sum(jnp.exp(s) * (s - m), axis=-1)


def loss(model, batch, settings):
    mask = batch["loss_mask"].astype(jnp.float32)
    logits = model(batch["inputs"], batch["segment_ids"], batch["positions"])
    div = jnp.sum(mask * generalized_jsd(batch["teacher_logits"], logits, settings.cfg.distill.beta))
    return div, div, mask.sum(), {}, {}


def _prepare(cfg, ts, mesh, data):
    from maxmodel.finetune.rl.rollout import PolicySampler
    from maxmodel.finetune.teacher import Teacher
    sampler, teacher = PolicySampler(cfg, ts, mesh, data), Teacher(cfg, mesh)

    def prepare(step, params, local):
        prompts, completions, _ = sampler.sample(step, params, local)
        batch = sampler.global_rows(sampler.rows(prompts, completions))
        prepare.metrics = sampler.metrics
        return {k: batch[k] for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")} | {
            "teacher_logits": teacher(batch)}
    return prepare


OBJECTIVE = Objective("gkd", loss, archs=("decoder",), extra_keys=("teacher_logits",), formats=("prompt",),
                      prepare=_prepare)
