"""One tiny random model and Engine shared by the generation tests (built once per test session: every test
module that uses it reuses the same compiled prefill / insert / step shapes)."""
from __future__ import annotations

import functools

VOCAB = 8          # small enough to enumerate every 3-token continuation (beam search's oracle)
MAX_SLOTS = 64     # = VOCAB ** 2: the exhaustive beam width for 3 new tokens
MAX_LEN = 48


@functools.cache
def tiny_engine(*overrides: str):
    import jax
    from flax import nnx

    from maxmodel.config import load_config_args
    from maxmodel.inference.engine import Engine, EngineOptions
    from maxmodel.parallel.mesh import build_mesh
    from maxmodel.parallel.rules import logical_rules
    from maxmodel.train.step import abstract_state, concrete_shardings, create_params
    cfg = load_config_args(["model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
                            "model.d_ff=64", f"model.vocab_size={VOCAB}", "mesh.data=1", "run.cpu_devices=1",
                            *overrides])
    mesh = build_mesh(cfg.mesh, jax.devices()[:1])
    rules = logical_rules("default")
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        graphdef, abstract = abstract_state(cfg)
        params = create_params(cfg, concrete_shardings(abstract, mesh))
    # One prefill bucket: every chunk compiles to the same shape.
    return Engine(cfg, graphdef, params, mesh, rules,
                  EngineOptions(max_slots=MAX_SLOTS, max_len=MAX_LEN, prefill_buckets=(16,)))
