"""`maxmodel shardings [CONFIG.yaml] [key=value ...] [--no-compile] [--json]`

Every parameter's shape, logical axes, mesh spec and bytes per device under the configured mesh and rules;
per-device totals for parameters, gradients and optimizer state; an activation estimate for the remat
policy; and XLA's own memory figures for the compiled step on this host's devices.
"""
from __future__ import annotations

import argparse
import math

from maxmodel import jsonio
from maxmodel.config import load_config_args

MIB = 1024 ** 2


def _per_device_bytes(shape, dtype, spec, mesh_shape) -> float:
    shards = 1
    for entry in spec:
        for axis in (entry if isinstance(entry, tuple) else (entry,)):
            if axis is not None:
                shards *= mesh_shape[axis]
    return math.prod(shape) * dtype.itemsize / shards


def _tree_bytes(abstract, shardings, mesh_shape) -> float:
    import jax
    return sum(_per_device_bytes(a.shape, a.dtype, s.spec, mesh_shape)
               for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))


def collect(cfg, compile_step: bool) -> dict:
    import jax
    from flax import nnx

    from maxmodel import distributed
    from maxmodel.planner.memory import activation_bytes
    from .step import abstract_state, batch_keys, batch_sharding, build_train_step

    from maxmodel.parallel.mesh import build_mesh
    from maxmodel.parallel.rules import mesh_rules, resolve_preset

    distributed.initialize(cfg.run.cpu_devices)
    mesh = build_mesh(cfg.mesh)
    shape = dict(mesh.shape)
    rules = mesh_rules(cfg.mesh, mesh)
    out: dict = {"mesh": shape, "rules": resolve_preset(cfg.mesh.rules, shape["stage"]), "parameters": []}
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        graphdef, abstract = abstract_state(cfg)
        ts = build_train_step(cfg, graphdef, abstract, mesh)
        for path, var in nnx.to_flat_state(abstract):
            value = var.get_value()
            spec = value.sharding.spec
            out["parameters"].append({
                "name": ".".join(str(p) for p in path), "shape": list(value.shape),
                "logical": list(var.get_metadata().get("out_sharding") or ()),
                "spec": [list(e) if isinstance(e, tuple) else e for e in spec],
                "bytes_per_device": _per_device_bytes(value.shape, value.dtype, spec, shape)})
        params = sum(p["bytes_per_device"] for p in out["parameters"])
        out["per_device_bytes"] = {
            "params": params, "grads": params,
            "optimizer": _tree_bytes(ts.abstract_opt, ts.opt_shardings, shape)}
        batch_shards = shape["data"] * shape["fsdp"] * shape["expert"]
        micro_batch = max(1, cfg.train.batch_size // (cfg.train.microbatches * batch_shards))
        out["per_device_bytes"]["activations_estimate"] = activation_bytes(
            cfg.model, cfg.train.seq_len // shape["sequence"], micro_batch, tensor=shape["tensor"],
            sequence_parallel=cfg.mesh.rules == "tp_sp", remat=cfg.train.remat, flash=False,
            act_bytes=2 if cfg.train.dtype in ("bfloat16", "float16") else 4)
        if shape["stage"] > 1:
            out["pipeline"] = pipeline_report(cfg, shape, micro_batch)
        if compile_step:
            from .checkpoint import abstract_like
            sh = batch_sharding(mesh)
            batch = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len),
                                             jax.numpy.float32 if k == "loss_mask" else jax.numpy.int32, sharding=sh)
                     for k in batch_keys(cfg)}
            compiled = ts.step_fn.lower(abstract_like(abstract, ts.param_shardings),
                                        abstract_like(ts.abstract_opt, ts.opt_shardings), batch).compile()
            mem = compiled.memory_analysis()
            out["xla_memory_analysis"] = {
                "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
                "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
                "code_bytes": mem.generated_code_size_in_bytes}
    return out


def pipeline_report(cfg, shape: dict, micro_batch: int) -> dict:
    """The schedule's ticks and bubble, and its peak activation bytes per device, estimated: GPipe's autodiff
    keeps every microbatch's residuals through the device's layers; 1F1B keeps at most `in_flight` stage
    inputs, plus one chunk's residuals while it recomputes (parallel/pipeline_1f1b.py); zero bubble also
    keeps the cotangents between a backward and its weight step. Zero bubble's ticks are shorter: a 1F1B
    backward tick computes the input and weight gradients, a zero-bubble one only one of them."""
    from maxmodel.parallel.mesh import ONE_F_ONE_B, ZERO_BUBBLE
    from maxmodel.parallel.pipeline import bubble_fraction
    from maxmodel.parallel.schedules import make_schedule, in_flight_cap
    from maxmodel.planner.memory import layer_activation_bytes
    pipe, m = cfg.pipeline, cfg.model
    S, R = shape["stage"], pipe.repeats
    M = pipe.microbatches or S
    rows = micro_batch // M if micro_batch >= M else 1  # rows of one pipeline microbatch per batch shard
    act = 2 if cfg.train.dtype in ("bfloat16", "float16") else 4
    seq = cfg.train.seq_len // shape["sequence"]
    layer = layer_activation_bytes(m, seq, rows, tensor=shape["tensor"], remat=cfg.train.remat, flash=False,
                                   act_bytes=act)
    per_stage = m.num_layers // S
    if pipe.schedule in ONE_F_ONE_B:
        sched = make_schedule(S, M, R, split_backward=pipe.schedule == ZERO_BUBBLE)
        in_flight = max(in_flight_cap(S, R, d) for d in range(S))
        kept = in_flight + (sched.ct_slots if sched.split_backward else 0)  # stage inputs (and cotangents)
        peak = kept * rows * seq * m.d_model * act + (per_stage // R) * layer
        ticks, bubble = sched.ticks, sched.bubble
    else:
        in_flight, peak = M * R, M * per_stage * layer
        ticks, bubble = M * R + S - 1, bubble_fraction(S, M, R)
    return {"schedule": pipe.schedule, "stages": S, "microbatches": M, "repeats": R, "ticks": ticks,
            "bubble": round(bubble, 4), "in_flight_microbatches": in_flight, "peak_activation_estimate": int(peak)}


def print_table(out: dict) -> None:
    mesh = " × ".join(f"{k}={v}" for k, v in out["mesh"].items() if v > 1) or "1 device"
    print(f"mesh {mesh}, rules '{out['rules']}'")
    rows = [(p["name"], "×".join(map(str, p["shape"])), ",".join(str(a) for a in p["logical"]),
             str(tuple(p["spec"])), f"{p['bytes_per_device'] / MIB:.3f}") for p in out["parameters"]]
    header = ("parameter", "shape", "logical axes", "mesh spec", "MiB/device")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print()
    for k, v in out["per_device_bytes"].items():
        print(f"{k:<22} {v / MIB:12.3f} MiB per device")
    if "pipeline" in out:
        p = out["pipeline"]
        print(f"pipeline {p['schedule']}: {p['stages']} stages × {p['repeats']} chunks, {p['microbatches']} "
              f"microbatches, {p['ticks']} ticks, bubble {p['bubble']:.1%}, at most {p['in_flight_microbatches']} "
              f"microbatches in flight per device, peak activations ≈ {p['peak_activation_estimate'] / MIB:.3f} "
              f"MiB per device")
    for k, v in out.get("xla_memory_analysis", {}).items():
        print(f"xla {k:<18} {v / MIB:12.3f} MiB per device")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="maxmodel shardings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", help="an optional CONFIG.yaml, then key.sub=value overrides")
    parser.add_argument("--no-compile", action="store_true", help="skip compiling the step")
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args(argv)
    cfg = load_config_args(ns.args)
    out = collect(cfg, not ns.no_compile)
    print(jsonio.dumps(out)) if ns.json else print_table(out)
    return 0
