"""Knowledge distillation (Hinton et al. 2015): the student matches the teacher's temperature-softened
next-token distribution (forward KL, scaled by T² so its gradients keep their size as T changes), mixed with
the hard-label loss: alpha · T² · KL(p_teacher,T || p_student,T) + (1 - alpha) · CE. Any data format the
next-token objectives read; the teacher's logits come from a Preparer (finetune/teacher.py).

The logged loss (and the held-out `eval_loss`) is the plain KL(teacher || student) at T = 1 per counted
token: how far the student is from the teacher; `ce` and `kd` are the two training terms."""
import jax
import jax.numpy as jnp

from .base import Objective


def kl_per_token(teacher_logits, student_logits, temperature: float = 1.0):
    """KL(softmax(t/T) || softmax(s/T)) at every position [B, L]."""
    t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def loss(model, batch, settings):
    d = settings.cfg.distill
    mask = batch["loss_mask"].astype(jnp.float32)
    logits = model(batch["inputs"], batch["segment_ids"], batch["positions"]).astype(jnp.float32)
    teacher = batch["teacher_logits"]
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    kd = d.temperature ** 2 * kl_per_token(teacher, logits, d.temperature)
    kl = kl_per_token(teacher, logits) if d.temperature != 1.0 else kd
    total = jnp.sum(mask * (d.alpha * kd + (1.0 - d.alpha) * ce))
    return total, jnp.sum(mask * kl), mask.sum(), {}, {"ce": jnp.sum(mask * ce), "kd": jnp.sum(mask * kd)}


def _prepare(cfg, ts, mesh, data):
    from maxmodel.finetune.teacher import Teacher
    from maxmodel.train.step import global_batch
    teacher = Teacher(cfg, mesh)

    def prepare(step, params, local):
        batch = global_batch(local, mesh)
        return {**batch, "teacher_logits": teacher(batch)}
    return prepare


OBJECTIVE = Objective("distill", loss, archs=("decoder",), extra_keys=("teacher_logits",),
                      metrics=("ce", "kd"), prepare=_prepare)
