import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from flax import nnx
from jax.sharding import PartitionSpec as P

from maxmodel.config import load_config
from maxmodel.models.layers import rope_frequencies
from maxmodel.parallel.mesh import build_mesh
from maxmodel.parallel.rules import logical_rules
from maxmodel.train.step import abstract_state, concrete_shardings, create_params


def _mesh_cfg(*extra):
    return load_config(overrides=TINY + list(extra))


def test_parameter_shardings_follow_logical_axes():
    cfg = _mesh_cfg("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    mesh = build_mesh(cfg.mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_rules("default")):
        _, abstract = abstract_state(cfg)
        params = create_params(cfg, concrete_shardings(abstract, mesh))
    specs = {jax.tree_util.keystr(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(params)}
    expected = {  # logical axes -> mesh axes under the default (fsdp + tensor) rules; 'layers' is unsharded
        "['embed']['table'].value": P("tensor", "fsdp"),                       # (vocab, embed)
        "['head'].value": P("fsdp", "tensor"),                                  # (embed, vocab)
        "['layers']['attn']['wq'].value": P(None, "fsdp", "tensor", None),     # (layers, embed, heads, head_dim)
        "['layers']['attn']['wk'].value": P(None, "fsdp", "tensor", None),     # (layers, embed, kv_heads, head_dim)
        "['layers']['attn']['wo'].value": P(None, "tensor", None, "fsdp"),     # (layers, heads, head_dim, embed)
        "['layers']['mlp']['wi'].value": P(None, "fsdp", "tensor"),            # (layers, embed, mlp)
        "['layers']['mlp']['wo'].value": P(None, "tensor", "fsdp"),            # (layers, mlp, embed)
        "['layers']['attn_norm']['scale'].value": P(None, None),               # (layers, norm)
    }
    for name, spec in expected.items():
        assert tuple(specs[name]) == tuple(spec), name
    # Created sharded: each device holds 1/4 of a (fsdp × tensor)-sharded matrix, never the whole.
    wi = params["layers"]["mlp"]["wi"].get_value()
    assert wi.addressable_shards[0].data.size == wi.size // 4


def test_rules_presets_change_layout_without_code():
    cfg = _mesh_cfg("mesh.fsdp=8", "mesh.data=1", "mesh.rules=fsdp")
    mesh = build_mesh(cfg.mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_rules("fsdp")):
        _, abstract = abstract_state(cfg)
        sh = concrete_shardings(abstract, mesh)
    assert tuple(sh["layers"]["mlp"]["wi"].get_value().spec) == (None, "fsdp", None)


def _model(cfg):
    with nnx.use_eager_sharding(False):
        from maxmodel.models.transformer import Transformer
        return Transformer(cfg, nnx.Rngs(0))


@pytest.mark.parametrize("extra", [[], ["model.parallel_block=true", "model.norm=layernorm", "model.use_bias=true",
                                        "model.activation=gelu", "model.positional=learned", "train.scan_layers=false"]])
def test_packed_documents_do_not_see_each_other(extra):
    """A row holding two documents gives the second one the same logits as running it alone."""
    cfg = _mesh_cfg(*extra)
    model = _model(cfg)
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(0, 512, 11), rng.integers(0, 512, 21)
    packed = jnp.asarray(np.concatenate([doc_a, doc_b])[None])
    segments = jnp.asarray([[1] * 11 + [2] * 21])
    positions = jnp.asarray([list(range(11)) + list(range(21))])
    together = model(packed, segments, positions)
    alone = model(jnp.asarray(doc_b[None]))
    np.testing.assert_allclose(together[0, 11:], alone[0], atol=1e-5)


def test_causality():
    model = _model(_mesh_cfg())
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 512, (1, 16)))
    changed = tokens.at[0, 10].set((tokens[0, 10] + 1) % 512)
    a, b = model(tokens), model(changed)
    np.testing.assert_allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not np.allclose(a[0, 10:], b[0, 10:])


def test_llama3_rope_scaling_frequencies():
    """LLaMA 3.1 rule: wavelengths above original_len/low_freq_factor are divided by the factor, below
    original_len/high_freq_factor kept, and smoothly interpolated in between."""
    cfg = _mesh_cfg("model.head_dim=128", "model.rope_theta=500000", "model.rope_scaling.factor=8",
                    "model.rope_scaling.low_freq_factor=1", "model.rope_scaling.high_freq_factor=4",
                    "model.rope_scaling.original_max_len=8192").model
    plain = 1.0 / 500000 ** (np.arange(0, 128, 2) / 128)
    scaled = rope_frequencies(cfg)
    wavelen = 2 * np.pi / plain
    assert np.allclose(scaled[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])
    assert np.allclose(scaled[wavelen > 8192], plain[wavelen > 8192] / 8)
    mid = (wavelen >= 8192 / 4) & (wavelen <= 8192)
    assert mid.any() and np.all(scaled[mid] < plain[mid]) and np.all(scaled[mid] > plain[mid] / 8)


def test_sliding_window_limits_context():
    cfg = _mesh_cfg("model.attention.sliding_window=4")
    model = _model(cfg)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 512, (1, 16)))
    changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % 512)
    a, b = model(tokens), model(changed)
    # With 2 layers and window 4, token 0 reaches at most positions 0..6.
    np.testing.assert_allclose(a[0, 7:], b[0, 7:], atol=1e-6)
    assert not np.allclose(a[0, 1:4], b[0, 1:4])


@pytest.mark.parametrize("extra", [[], ["model.tie_embeddings=true", "model.activation=gelu"],
                                   ["model.num_kv_heads=1", "model.use_bias=true", "model.norm=layernorm"]])
def test_planner_formula_counts_the_same_parameters_as_the_model(extra):
    """The planner counts parameters from the shape without JAX (it must answer in under a second); the
    model's own count (nnx.eval_shape) is the reference."""
    from maxmodel.models.params import count_params as model_count
    from maxmodel.planner.shape import count_params as formula_count
    cfg = _mesh_cfg(*extra)
    exact, formula = model_count(cfg), formula_count(cfg.model)
    assert formula["total"] == exact["total"]
    assert formula["non_embedding"] == exact["non_embedding"]
