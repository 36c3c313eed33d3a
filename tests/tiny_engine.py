"""One tiny random model and Engine shared by the generation tests (built once per test session: every test
module that uses it reuses the same compiled prefill / insert / step shapes)."""
from __future__ import annotations

import functools

VOCAB = 8          # small enough to enumerate every 3-token continuation (beam search's oracle)
MAX_SLOTS = 64     # = VOCAB ** 2: the exhaustive beam width for 3 new tokens
MAX_LEN = 48


def build_engine(overrides=(), devices: int = 1, **options):
    """An Engine over a random model of `overrides` on the first `devices` devices (EngineOptions from
    `options`): the one way the generation tests build engines."""
    import jax
    from flax import nnx

    from maxmodel.config import load_config_args
    from maxmodel.inference.engine import Engine, EngineOptions
    from maxmodel.parallel.mesh import build_mesh
    from maxmodel.parallel.rules import mesh_rules
    from maxmodel.train.step import abstract_state, concrete_shardings, create_params
    cfg = load_config_args(list(overrides))
    mesh = build_mesh(cfg.mesh, jax.devices()[:devices])
    rules = mesh_rules(cfg.mesh, mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        graphdef, abstract = abstract_state(cfg)
        params = create_params(cfg, concrete_shardings(abstract, mesh))
    return Engine(cfg, graphdef, params, mesh, rules, EngineOptions(**options))


@functools.cache
def tiny_engine(*overrides: str):
    # One prefill bucket: every chunk compiles to the same shape.
    return build_engine(["model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
                         "model.d_ff=64", f"model.vocab_size={VOCAB}", "mesh.data=1", "run.cpu_devices=1",
                         *overrides], max_slots=MAX_SLOTS, max_len=MAX_LEN, prefill_buckets=(16,))
