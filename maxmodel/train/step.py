"""Model state creation and the one jitted train step (explicit shardings, donated state)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from maxmodel.config.schema import Config
from maxmodel.finetune import objectives, peft
from maxmodel.finetune.peft import lora
from maxmodel.finetune.objectives import BATCH_KEYS, PROMPT_KEYS, LossSettings
from maxmodel.finetune.peft.config import prompt_slots
from maxmodel.models.moe import update_router_bias
from maxmodel.models.registry import build_model
from maxmodel.parallel.mesh import ZERO_BUBBLE, check_layout

from . import guards
from .optimizer import learning_rate_schedule, make_optimizer
from .profiling import compile_cache_off


def batch_keys(cfg: Config) -> tuple[str, ...]:
    """The arrays one batch holds for this config's objective (and its soft prompts' places)."""
    return BATCH_KEYS + objectives.get(cfg.train.objective).extra_keys + (PROMPT_KEYS if prompt_slots(cfg) else ())


def batch_sharding(mesh) -> NamedSharding:
    """Rows over the batch axes of the activation rules (data, fsdp, expert), sequence over `sequence`."""
    from flax.core import spmd
    spec = spmd.apply_rules(PartitionSpec("activation_batch", "activation_length"), None)
    return NamedSharding(mesh, spec)


def abstract_state(cfg: Config) -> tuple[nnx.GraphDef, nnx.State]:
    """Shapes, dtypes and shardings of every parameter, without allocating (use under mesh + rules)."""
    model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(cfg.train.seed)))
    return nnx.split(model)


def concrete_shardings(abstract, mesh) -> Any:
    """The abstract tree's shardings (specs from the logical rules) on the concrete mesh."""
    return jax.tree.map(lambda x: NamedSharding(mesh, x.sharding.spec), abstract)


def zero1_sharding(sharding: NamedSharding, shape, mesh) -> NamedSharding:
    """ZeRO-1: an optimizer moment additionally split over `data` along its first unsharded dimension that
    divides evenly (parameters and gradients stay as they are; the compiler gathers the update)."""
    n = mesh.shape["data"]
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for i, (entry, dim) in enumerate(zip(spec, shape)):
        axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        if n > 1 and all(mesh.shape[a] == 1 for a in axes) and dim % n == 0:  # size-1 axes split nothing
            spec[i] = ("data", *axes) if axes else "data"
            return NamedSharding(mesh, PartitionSpec(*spec))
    return sharding


def create_params(cfg: Config, param_sh) -> nnx.State:
    """Parameters created inside jit, each already sharded by its logical axes (never whole on one device)."""
    def init():
        return nnx.split(build_model(cfg, nnx.Rngs(cfg.train.seed)))[1]
    return jax.jit(init, out_shardings=param_sh)()


@dataclass
class TrainStep:
    """Holds the compiled step and everything it was compiled for. `step_fn`, `eval_fn` and `init_opt` take
    the whole parameter state; only its trainable part (all of it in full training, the adapters with
    peft.method) has gradients, optimizer state and donated buffers (see SplitStep)."""
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: Callable
    step_fn: Callable
    eval_fn: Callable
    init_opt: Callable
    param_shardings: Any
    opt_shardings: Any
    abstract_opt: Any
    trainable: Any = None                  # the nnx filter of the trainable variables


@dataclass
class SplitStep:
    """(params, opt_state, batch) -> (params, opt_state, metrics) over a jitted step that takes the trainable
    and the frozen parameters apart: the frozen ones are read, never donated, differentiated or updated, so
    a frozen base costs its own bytes and nothing more. `lower` lowers the same way (ahead-of-time compiles).
    With `cached=False` it compiles past the persistent compilation cache."""
    jitted: Callable
    trainable: Any
    cached: bool = True

    def compiling(self):
        return contextlib.nullcontext() if self.cached else compile_cache_off()

    def _split(self, params):
        return nnx.split_state(params, self.trainable, ...)

    def __call__(self, params, opt_state, batch):
        with self.compiling():
            return self._run(self.jitted, params, opt_state, batch)

    def _run(self, fn, params, opt_state, batch):
        trainable, frozen = self._split(params)
        trainable, opt_state, metrics = fn(trainable, frozen, opt_state, batch)
        return nnx.merge_state(trainable, frozen), opt_state, metrics

    def lower(self, params, opt_state, batch):
        trainable, frozen = self._split(params)
        return _Split(self, self.jitted.lower(trainable, frozen, opt_state, batch))


@dataclass
class _Split:
    """A lowered or compiled split step that still takes (params, opt_state, batch); everything else (text,
    cost and memory analyses) is the wrapped object's."""
    step: SplitStep
    inner: Any

    def compile(self):
        with self.step.compiling():
            return _Split(self.step, self.inner.compile())

    def __call__(self, params, opt_state, batch):
        return self.step._run(self.inner, params, opt_state, batch)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _loss_sums(objective, graphdef, states, batch, settings: LossSettings, order=None, moe=None):
    """(objective, (nll, token count, MoE stats, the objective's metrics)). `states`: the parameter states
    (trainable, frozen) that make the model; `settings.gradients` (the train step) switches its dropout on
    (LoRA's, the only one). MoE aux losses are per-token means, so they enter the summed objective multiplied
    by the token count: after the step's division by the total count (also across microbatches) they carry
    their configured weight."""
    if order is not None:  # causal load balancing for ring attention: every token's mask uses its position
        batch = {k: v[:, order] for k, v in batch.items()}
    model = nnx.merge(graphdef, *states)
    if settings.gradients:
        model.train()
    total, nll, count, stats, metrics = objective.loss(model, batch, settings)
    aux = 0.0
    # a 1F1B pipeline (models/transformer.py pipelined_loss) has the aux losses in its objective already
    if stats and moe is not None and not (settings.gradients and getattr(model, "one_f_one_b", lambda: False)()):
        aux = (moe.aux_loss_weight * jnp.sum(stats["aux_loss"]) + moe.z_loss_weight * jnp.sum(stats["z_loss"]))
    return total + aux * count, (nll, count, stats, metrics)


def fused_loss_chunk(cfg: Config, mesh) -> int:
    """Chunk length of the fused head + loss, or 0 for the materialised logits. The fused path needs plain
    logits (no soft-cap), a plain projection (not the encoder's masked-LM head, which has its own transform and
    output bias) and whole sequences on each device (no context parallelism)."""
    c = cfg.train.loss_chunk
    if not c or cfg.model.final_logit_softcap or cfg.model.arch == "encoder" or mesh.shape.get("sequence", 1) > 1:
        return 0
    return c


def build_train_step(cfg: Config, graphdef: nnx.GraphDef, abstract_params: nnx.State, mesh) -> TrainStep:
    """Compile-ready step: (params, opt_state, batch) -> (params, opt_state, metrics).

    Gradient accumulation sums per-token losses and gradients over `train.microbatches` and divides once by
    the total token count, so the update equals the un-accumulated step's."""
    check_layout(cfg, dict(mesh.shape))
    objective = objectives.get(cfg.train.objective)
    trainable_filter = peft.trainable_filter(cfg.peft)
    abstract_train, abstract_frozen = nnx.split_state(abstract_params, trainable_filter, ...)
    tx = guards.guarded(make_optimizer(cfg.optimizer, cfg.train.steps), cfg.train)
    schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    param_sh = concrete_shardings(abstract_params, mesh)
    train_sh, frozen_sh = nnx.split_state(param_sh, trainable_filter, ...)
    opt_shapes = jax.eval_shape(tx.init, abstract_train)
    replicated = NamedSharding(mesh, PartitionSpec())
    # tree_map_params runs tx.init on placeholders eagerly: keep that on a host device, not the step's mesh
    # (which may be a TPU topology being compiled ahead of time from this CPU host).
    moment_sharding = (lambda leaf, s: zero1_sharding(s, leaf.shape, mesh)) if cfg.mesh.zero1 else (lambda _, s: s)
    with jax.set_mesh(jax.sharding.Mesh(jax.devices("cpu")[:1], ("host",))):
        opt_sh = optax.tree_map_params(tx, moment_sharding, opt_shapes, train_sh,
                                       transform_non_params=lambda _: replicated)
    data_sh = batch_sharding(mesh)
    micro = cfg.train.microbatches
    settings = LossSettings(cfg.train.z_loss, fused_loss_chunk(cfg, mesh), cfg, gradients=True)
    order = None
    if cfg.model.attention.context_parallel == "ring" and mesh.shape["sequence"] > 1:
        from maxmodel.parallel.ring_attention import load_balance_permutation
        order = load_balance_permutation(cfg.train.seq_len, mesh.shape["sequence"])
    moe = cfg.model.moe if cfg.model.moe.num_experts else None
    # differentiated with respect to the trainable state only: the frozen one gets no gradient buffers
    # (the frozen state's Variables are rebuilt here, at the gradient's trace level: nnx.scan over the layers
    # refuses Variables from the enclosing jit's level; the identity map moves no data)
    grad_fn = jax.value_and_grad(
        lambda t, f, b: _loss_sums(objective, graphdef, (t, jax.tree.map(lambda x: x, f)), b, settings, order, moe),
        has_aux=True)

    def gradients(trainable, frozen, batch, step):
        if micro == 1:
            (_, (nll, count, stats, extra)), grads = grad_fn(trainable, lora.for_step(frozen, step), batch)
            return grads, nll, count, stats, extra

        def split(x):  # [B, L] -> [M, B/M, L]: microbatch i takes rows i, i+M, ... (stays evenly sharded)
            return x.reshape(x.shape[0] // micro, micro, *x.shape[1:]).swapaxes(0, 1)

        def body(carry, indexed):
            acc, nll_acc, count_acc, extra_acc = carry
            i, mb = indexed
            (_, (nll, count, stats, extra)), grads = grad_fn(trainable, lora.for_step(frozen, step, i), mb)
            return (jax.tree.map(jnp.add, acc, grads), nll_acc + nll, count_acc + count,
                    jax.tree.map(jnp.add, extra_acc, extra)), stats
        zeros = jax.tree.map(jnp.zeros_like, trainable)
        extra0 = {k: jnp.zeros((), jnp.float32) for k in objective.metrics}
        (grads, nll, count, extra), stats = jax.lax.scan(body, (zeros, 0.0, 0.0, extra0),
                                                         (jnp.arange(micro), jax.tree.map(split, batch)))
        return grads, nll, count, jax.tree.map(lambda s: jnp.mean(s, axis=0), stats), extra  # MoE stats: mean

    def step(trainable, frozen, opt_state, batch):
        grads, nll, count, stats, extra = gradients(trainable, frozen, batch, opt_state.steps)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = nll / denom
        updates, opt_state = tx.update(grads, opt_state, trainable, loss=loss)  # skips non-finite / spiking steps
        trainable = optax.apply_updates(trainable, updates)
        if moe is not None and moe.bias_balancing:  # DeepSeek-V3: routing biases follow the load, not gradients
            trainable = update_router_bias(graphdef, trainable, stats["load"], moe.bias_update_rate)
        # an objective's metrics are sums over what it counts, like its loss: reported as means per count
        return trainable, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": count,
                                      **{k: v / denom for k, v in extra.items()}, **guards.metrics(opt_state), **({"moe": stats} if stats else {})}

    def evaluate(params, batch):  # -> (summed loss, count, the objective's summed metrics)
        _, (nll, count, _, extra) = _loss_sums(objective, graphdef, (params,), batch,
                                               LossSettings(0.0, settings.loss_chunk, cfg), order, None)
        return nll, count, extra

    batch_sh = data_sh  # a prefix of the batch dict: every array has rows over the batch axes
    jitted = jax.jit(step, in_shardings=(train_sh, frozen_sh, opt_sh, batch_sh),
                     out_shardings=(train_sh, opt_sh, replicated), donate_argnums=(0, 2))  # only what changes
    # a cached copy of this program can deadlock on emulated CPU devices (profiling.compile_cache_off)
    uncached = cfg.pipeline.schedule == ZERO_BUBBLE and mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"
    step_fn = SplitStep(jitted, trainable_filter, cached=not uncached)
    eval_fn = jax.jit(evaluate, in_shardings=(param_sh, batch_sh), out_shardings=replicated)
    init_train = jax.jit(tx.init, in_shardings=(train_sh,), out_shardings=opt_sh)

    def init_opt(params):
        return init_train(nnx.split_state(params, trainable_filter, ...)[0])
    return TrainStep(graphdef, tx, schedule, step_fn, eval_fn, init_opt, param_sh, opt_sh, opt_shapes,
                     trainable_filter)


def global_batch(local: dict, mesh) -> dict:
    """Assemble this process's rows into global arrays sharded over the batch axes."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, v) for k, v in local.items()}
