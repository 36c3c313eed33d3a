"""The training loop, top to bottom: set up, restore, step, log, evaluate, checkpoint, finish."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import yaml
from flax import nnx
from tqdm import tqdm

from maxmodel import distributed, jsonio
from maxmodel.config.schema import Config, run_dir_of, to_dict
from maxmodel.data.pipeline import make_train_data
from maxmodel.finetune import objectives
from maxmodel.parallel.mesh import build_mesh
from maxmodel.parallel.rules import mesh_rules

from . import guards
from .checkpoint import Checkpointer, abstract_like
from .export import load_params
from .goodput import Goodput
from .metrics import MetricsWriter, flops_per_token, matmul_params, moe_record, peak_flops_per_device
from .preemption import PreemptionWatch
from .profiling import StepProfiler, enable_compile_cache
from .state_bytes import describe, state_report
from .step import abstract_state, build_train_step, create_params, global_batch

log = logging.getLogger("maxmodel.train")


class Preempted(Exception):
    """Raised after a clean checkpoint when SIGTERM/SIGINT arrived; the CLI exits 3."""


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int
    final_step: int
    losses: dict[int, float] = field(default_factory=dict)
    eval_loss: float | None = None
    eval_metrics: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    params: object = None
    graphdef: object = None
    tokenizer: object = None
    mesh: object = None


@contextlib.contextmanager
def _closing(writer, ckpt):
    """Close the metrics writer and the checkpointer (waiting for its saves) however the run ends."""
    try:
        yield
    finally:
        writer.close()
        if ckpt:
            ckpt.close()


def evaluate(ts, params, data, mesh, num_batches: int, prepare) -> tuple[float | None, dict]:
    """(held-out loss per counted unit, {eval_<metric>: value}: the objective's metrics as means per counted
    unit too); the loss is None when the held-out split has no whole global batch."""
    nll, count, extra = 0.0, 0.0, {}
    for batch in data.eval_batches(num_batches):
        n, c, m = ts.eval_fn(params, prepare(None, params, batch))
        nll, count = nll + float(n), count + float(c)
        extra = {k: extra.get(k, 0.0) + float(v) for k, v in m.items()}
    if not count:
        return None, {}
    return nll / count, {f"eval_{k}": v / count for k, v in extra.items()}


def _plain_batch(mesh):
    """The default Preparer: this process's rows, assembled into the global batch."""
    return lambda step, params, local: global_batch(local, mesh)


def train(cfg: Config, stop_at_step: int | None = None) -> TrainResult:
    """Train to `train.steps`, resuming from the run directory's latest checkpoint. `stop_at_step` ends the
    run early (with a checkpoint), as a preemption would."""
    goodput = Goodput()  # laps below split the wall time: restart, compile, data wait, steps, eval, checkpoints
    info = distributed.initialize(cfg.run.cpu_devices)
    enable_compile_cache(cfg.run.compile_cache_dir)
    main = info.process_index == 0
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    mesh = build_mesh(cfg.mesh)
    rules = mesh_rules(cfg.mesh, mesh)
    data = make_train_data(cfg, run_dir, info.process_index, info.process_count)
    ckpt = Checkpointer(cfg.checkpoint, run_dir / "checkpoints") if cfg.checkpoint.enabled else None
    writer = MetricsWriter(run_dir, enabled=main)
    result = TrainResult(run_dir, 0, 0, stats=dict(data.stats))
    peak, peak_source = peak_flops_per_device(dtype=cfg.train.dtype)  # outside the mesh context: a one-device matmul
    profiler = StepProfiler(cfg.train.profile_steps, run_dir / "profile")

    with (jax.set_mesh(mesh), nnx.logical_axis_rules(rules), PreemptionWatch() as preemption,
          _closing(writer, ckpt)):
        graphdef, abstract = abstract_state(cfg)
        ts = build_train_step(cfg, graphdef, abstract, mesh)
        sizes = state_report(abstract, ts.trainable, ts.abstract_opt)
        result.stats["state"] = sizes
        log.info("%s", describe(sizes))  # at the start of every run, fresh or resumed
        param_target = abstract_like(abstract, ts.param_shardings)
        restored = ckpt.restore_latest({"params": param_target, "opt_state": abstract_like(
            ts.abstract_opt, ts.opt_shardings)}) if ckpt else None
        if restored:  # continue this run exactly where its newest intact checkpoint left it
            params, opt_state, start = restored.params, guards.resumed(restored.opt_state), restored.step
            if restored.data:
                data.train.set_state(restored.data)
            log.info("resumed from step %d in %s", start, restored.directory)
        else:  # a new run: fresh weights, or exported ones (init.from); always a fresh optimizer
            if cfg.init.from_ and cfg.peft.method != "none":  # adapters (a quantized base) over the export
                from .export import from_base
                params = from_base(cfg, cfg.init.from_, ts.param_shardings)
            else:
                params = load_params(cfg.init.from_, param_target) if cfg.init.from_ else create_params(
                    cfg, ts.param_shardings)
            opt_state, start = ts.init_opt(params), 0
        result.start_step = start
        objective = objectives.get(cfg.train.objective)
        # the objective's host work between the data pipeline and the step (reference log-probs, rollouts)
        prepare = objective.prepare(cfg, ts, mesh, data) if objective.prepare else _plain_batch(mesh)

        tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        moe = cfg.model.moe
        flops_tok = flops_per_token(cfg.model, matmul_params(abstract, moe.top_k / max(moe.num_experts, 1)),
                                    cfg.train.seq_len, cfg.model.tie_embeddings)
        peak_total = peak * jax.device_count()
        result.stats.update(flops_per_token=flops_tok, peak_flops=peak_total, peak_source=peak_source)
        evaluator = None
        if cfg.run.eval_tasks:  # lm-eval / native tasks on the live parameters (eval/during_training.py)
            from maxmodel.eval.during_training import TrainingEvaluator
            evaluator = TrainingEvaluator(cfg, graphdef, mesh, rules, data.tokenizer)
        bar = tqdm(total=cfg.train.steps, initial=start, disable=not (main and cfg.run.progress),
                   desc=cfg.run.name, unit="step", dynamic_ncols=True)
        interval_start, interval_steps, compile_seconds = time.perf_counter(), 0, None
        data_wait = 0.0  # seconds spent waiting in next(data.train) during the interval
        step, last_record = start, {}
        end = cfg.train.steps if stop_at_step is None else min(stop_at_step, cfg.train.steps)
        goodput.lap("restart")  # set-up, restore (and on a fresh run, initialisation) before the first step
        try:
            while step < end:
                goodput.lap("productive")  # the previous step's remaining host work (logging, syncs)
                wait_start = time.perf_counter()
                local = next(data.train)
                data_wait += time.perf_counter() - wait_start
                goodput.lap("data_wait")
                batch = prepare(step, params, local)
                profiler.before_step(step)
                params, opt_state, metrics = ts.step_fn(params, opt_state, batch)
                step += 1
                profiler.after_step(step, metrics)
                interval_steps += 1
                bar.update(1)
                if compile_seconds is None:  # the first step includes compilation: time it apart
                    jax.block_until_ready(metrics)
                    compile_seconds = time.perf_counter() - interval_start
                    interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
                    result.stats["compile_seconds"] = compile_seconds
                    goodput.lap("compile")
                record = {}
                logging_now = step % cfg.run.log_every == 0 or step == end
                if logging_now:
                    m = jax.device_get(metrics)
                    elapsed = time.perf_counter() - interval_start
                    step_time = elapsed / interval_steps if interval_steps else float("nan")
                    tps = tokens_per_step / step_time if interval_steps else float("nan")
                    record = {"loss": float(m["loss"]), "lr": float(ts.schedule(step - 1)),
                              "grad_norm": float(m["grad_norm"]), "tokens_per_sec": tps,
                              "step_time": step_time, "mfu": tps * flops_tok / peak_total,
                              "skipped_steps": int(m["skipped_steps"]), "spike_skips": int(m["spike_skips"]),
                              "data_wait": data_wait / elapsed if interval_steps else 0.0,
                              **goodput.metrics()}
                    if "moe" in m:
                        record.update(moe_record(m["moe"]))
                    record.update({k: float(v) for k, v in m.items() if k in objective.metrics})
                    record.update(getattr(prepare, "metrics", {}))
                    last_record = record
                    if record["data_wait"] > 0.05:
                        log.warning("step %d: %.0f%% of step time spent waiting for data (raise data.prefetch "
                                    "or data.workers, or prepare shards)", step, 100 * record["data_wait"])
                    result.losses[step] = record["loss"]
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{record['mfu']:.1%}")
                    interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
                eval_due = step % cfg.run.eval_every == 0 or step == cfg.train.steps
                if eval_due and (data.eval_source is not None or evaluator is not None):
                    goodput.lap("productive")
                    t0 = time.perf_counter()
                    if data.eval_source is not None:
                        result.eval_loss, eval_metrics = evaluate(ts, params, data, mesh, cfg.run.eval_batches,
                                                                  prepare)
                        if result.eval_loss is not None:
                            record["eval_loss"] = result.eval_loss
                            record.update(eval_metrics)
                            result.eval_metrics = eval_metrics
                    if evaluator is not None:  # run.eval_tasks, with or without a held-out split
                        record.update(evaluator(params, step))
                    interval_start += time.perf_counter() - t0  # eval time is not step time
                    goodput.lap("eval")
                if record:
                    writer.write(step, record)
                preempted = preemption.requested(step)
                due = ckpt.due(step, end) if ckpt else []
                # `stop` mode: skipped updates keep the state at its last good value; notice it when syncing.
                halted = bool(logging_now or due or preempted) and guards.halted(metrics, cfg.train)
                if ckpt and (preempted or halted):
                    due = ckpt.due(step, end, force=True)
                if due:
                    goodput.lap("productive")
                    t0 = time.perf_counter()
                    meta = {"config": to_dict(cfg), "metrics": last_record, "seed": cfg.train.seed}
                    ckpt.save(step, due, params, opt_state, data.train.get_state(), meta)
                    interval_start += time.perf_counter() - t0  # neither is checkpoint time
                    goodput.lap("checkpoint")
                if preempted or halted:
                    if ckpt:
                        ckpt.wait()  # committed before we exit
                    if halted:
                        raise guards.stop_error(metrics, step, saved=ckpt is not None)
                    raise Preempted(f"stopped by signal {preemption.signal} at step {step}"
                                    + ("; checkpoint written" if ckpt else " (checkpointing is off)"))
        finally:
            bar.close()
            profiler.stop()
        goodput.lap("productive")
        if ckpt:
            ckpt.wait()  # the last saves are part of this run's checkpoint time
            goodput.lap("checkpoint")
        result.stats["goodput"] = goodput.metrics()
        if main:
            (run_dir / "goodput.json").write_text(jsonio.dumps(goodput.metrics(), indent=1))
        log.info("%s", goodput.summary())
        result.final_step = step
        result.params, result.graphdef, result.tokenizer, result.mesh = params, graphdef, data.tokenizer, mesh
    return result
