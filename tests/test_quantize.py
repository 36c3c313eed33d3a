"""Weight quantization for inference (maxmodel/inference/quantize.py) and the int8 KV cache, on trained tiny
models: logit error against float, stored bytes, scanned / unrolled / MoE / tied stacks, an 8-device mesh.

Tolerances (measured on these trained models, with headroom): E_max = max |logit - float logit| over a
position's vocabulary divided by the std of the float logits, E_mean the same with the mean over all
positions and logits. int8 weights: E_max < 0.1, E_mean < 0.015, top-1 agreement >= 98% (measured 0.024-0.050,
0.004-0.007, 99.6-100%); int4, group 32: E_max < 1.5, E_mean < 0.2, top-1 >= 90% (0.45-0.76, 0.07-0.11,
93-100%). MoE: the same, except that up to 1% of positions may exceed E_max: a token whose router scores
are nearly tied can switch experts, which moves its logits by about one std (checked: the one outlier
position of the MoE model switched experts; the positions that did not switch stay within 0.03). int8 KV
cache against the float cache: E_max < 0.02."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY
from flax import nnx

from maxmodel.config import load_config
from maxmodel.config.errors import ConfigError
from maxmodel.inference.quantize import QuantizedWeight, quantize_params, weight_bytes
from maxmodel.models.transformer import Transformer
from maxmodel.parallel.mesh import build_mesh
from maxmodel.parallel.rules import logical_rules
from maxmodel.train.step import abstract_state, concrete_shardings

TOL = {"int8": (0.1, 0.015, 0.98), "int4": (1.5, 0.2, 0.90)}  # E_max, E_mean, top-1
GROUP = 32  # divides every contraction length of TINY (d_model 64, heads x head_dim 64, d_ff 128)


def _tokens(rng, batch: int, length: int = 32) -> np.ndarray:
    """Rows of an affine recurrence t -> 5t + 3 mod 512 with 10% random tokens: a learnable pattern."""
    rows = np.empty((batch, length), np.int64)
    rows[:, 0] = rng.integers(0, 512, batch)
    for i in range(1, length):
        rows[:, i] = (5 * rows[:, i - 1] + 3) % 512
    noise = rng.random((batch, length)) < 0.1
    return np.where(noise, rng.integers(0, 512, (batch, length)), rows)


@functools.cache
def _fresh(*extra: str):
    """(cfg, float params) of an untrained TINY model: for what does not depend on the values."""
    cfg = load_config(overrides=TINY + list(extra))
    with nnx.use_eager_sharding(False):
        return cfg, nnx.split(Transformer(cfg, nnx.Rngs(0)))[1]


@functools.cache
def _trained(*extra: str):
    """(cfg, graphdef, float params) of a TINY model after 60 Adam steps on the pattern."""
    cfg = load_config(overrides=TINY + list(extra))
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt, tokens):
        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt
    opt, rng = tx.init(params), np.random.default_rng(0)
    for _ in range(60):
        params, opt = step(params, opt, jnp.asarray(_tokens(rng, 16, 33)))
    return cfg, graphdef, params


_JITTED: dict = {}  # graphdefs hold the (unhashable) config: one set of jitted functions per graphdef object


def _jitted(graphdef):
    if id(graphdef) not in _JITTED:
        def logits(params, tokens):
            return nnx.merge(graphdef, params)(tokens)

        def prefill(params, tokens, quantized_cache):
            model = nnx.merge(graphdef, params)
            b, t = tokens.shape
            cache = model.init_cache(b, 32, quantized=quantized_cache)
            h, cache = model.decode(tokens, jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.zeros(b, jnp.int32), cache)
            return model.logits(h), cache

        def step(params, token, length, cache):
            model = nnx.merge(graphdef, params)
            b = token.shape[0]
            h, cache = model.decode(token, jnp.full((b, 1), length), jnp.full(b, length), cache)
            return model.logits(h), cache
        _JITTED[id(graphdef)] = (graphdef, jax.jit(logits), jax.jit(prefill, static_argnums=2), jax.jit(step))
    return _JITTED[id(graphdef)][1:]


def _logits(graphdef, params, tokens):
    return _jitted(graphdef)[0](params, tokens)


def _error(ref, out):
    """(per-position E_max [B, L], E_mean, top-1 agreement)."""
    diff = jnp.abs(out - ref) / jnp.std(ref)
    return jnp.max(diff, axis=-1), float(jnp.mean(diff)), float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(ref, -1)))


def _within(ref, out, mode, outliers: float = 0.0):
    per_position, mean, top1 = _error(ref, out)
    max_tol, mean_tol, top1_tol = TOL[mode]
    over = float(jnp.mean(per_position >= max_tol))
    assert over <= outliers and mean < mean_tol and top1 >= top1_tol, (float(per_position.max()), mean, top1, over)
    assert mean > 0  # the weights really changed


EVAL = jnp.asarray(_tokens(np.random.default_rng(1), 8))


@pytest.mark.parametrize("extra", [("train.scan_layers=true",), ("train.scan_layers=false",),
                                   ("model.moe.num_experts=4",), ("model.tie_embeddings=true",)])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_logits_within_tolerance_of_float(extra, mode):
    cfg, graphdef, params = _trained(*extra)
    ref = _logits(graphdef, params, EVAL)
    assert float(jnp.mean(jnp.argmax(ref[:, :-1], -1) == EVAL[:, 1:])) > 0.5  # the model did learn
    q = quantize_params(cfg, params, mode, group_size=GROUP)
    _within(ref, _logits(graphdef, q, EVAL), mode, outliers=0.01 if "moe" in extra[0] else 0.0)


def _quantized_names(q):
    return {".".join(map(str, p)) for p, v in nnx.to_flat_state(q) if isinstance(v.get_value(), QuantizedWeight)}


def test_every_linear_weight_is_quantized_and_nothing_else():
    cfg, params = _fresh("model.moe.num_experts=4", "model.moe.shared_experts=1")
    names = _quantized_names(quantize_params(cfg, params, "int8"))
    expected = {f"layers.attn.{w}" for w in ("wq", "wk", "wv", "wo")} | {"head"}
    expected |= {f"layers.mlp.expert_{w}" for w in ("wi", "wg", "wo")}
    expected |= {f"layers.mlp.shared.{w}" for w in ("wi", "wg", "wo")}
    assert names == expected  # the router, norms and the untied embedding table stay float
    cfg, params = _fresh("model.tie_embeddings=true", "train.scan_layers=false")
    names = _quantized_names(quantize_params(cfg, params, "int4", group_size=GROUP))
    assert "embed.table" in names and "layers.1.mlp.wg" in names and len(names) == 1 + 2 * 7


@pytest.mark.parametrize("extra", [("train.scan_layers=true",), ("model.tie_embeddings=true",),
                                   ("model.moe.num_experts=4",)])
def test_linear_weight_bytes_shrink_4x_and_8x(extra):
    cfg, params = _fresh(*extra)
    full = weight_bytes(params, cfg)
    # int8: 1 byte per weight + one f32 scale per output channel (a column of K = 64 or 128 weights here);
    # int4 (group g): half a byte per weight + one f32 scale per g weights. Exact, from the shapes:
    for mode, per_weight in (("int8", 1.0), ("int4", 0.5)):
        q = quantize_params(cfg, params, mode, group_size=GROUP)
        expected = 0
        for _, v in nnx.to_flat_state(q):
            w = v.get_value()
            if isinstance(w, QuantizedWeight):
                i1 = w.q.ndim - w.n_after
                k = int(np.prod(w.q.shape[i1 - w.n_in:i1]))
                assert w.q.size // w.scale.size == (k if mode == "int8" else GROUP)
                expected += w.q.size * per_weight + w.scale.size * 4
        assert weight_bytes(q, cfg) == expected
        ratio = full / weight_bytes(q, cfg)
        assert (3.7 < ratio < 4.0) if mode == "int8" else (6.3 < ratio < 6.5), (mode, ratio)  # 8/(1+8/32) = 6.4
    # int4 codes really take half a byte on the device (XLA packs them)
    w = next(v.get_value() for _, v in nnx.to_flat_state(q) if isinstance(v.get_value(), QuantizedWeight))
    assert w.q.dtype == jnp.int4 and w.q.on_device_size_in_bytes() == w.q.size // 2


def test_group_size_128_gives_7_5x():
    cfg, params = _fresh("model.d_model=128", "model.num_heads=4", "model.d_ff=256")
    ratio = weight_bytes(params, cfg) / weight_bytes(quantize_params(cfg, params, "int4", 128), cfg)
    assert ratio == pytest.approx(4 / (0.5 + 4 / 128))  # 7.53x


def test_bad_mode_and_group_size_name_the_key():
    cfg, params = _fresh("train.scan_layers=true")
    with pytest.raises(ConfigError, match="quantize.mode"):
        quantize_params(cfg, params, "int3")
    with pytest.raises(ConfigError, match=r"quantize.group_size.*group_size=48 does not divide the contraction length 64 of head"):
        quantize_params(cfg, params, "int4", group_size=48)


def _generate_logits(graphdef, params, quantized_cache):
    """Prefill 24 tokens of EVAL, then feed the other 8 one at a time: logits [B, 32], final cache."""
    _, prefill, step = _jitted(graphdef)
    out, cache = prefill(params, EVAL[:, :24], quantized_cache)
    out = [out]
    for i in range(24, 32):
        logits, cache = step(params, EVAL[:, i:i + 1], i, cache)
        out.append(logits)
    return jnp.concatenate(out, axis=1), cache


@pytest.mark.parametrize("extra", [("train.scan_layers=true",), ("train.scan_layers=false",),
                                   ("model.moe.num_experts=4",)])
def test_decode_with_int8_weights_and_int8_kv_cache(extra):
    """int8 weights + int8 cache against float weights + float cache, through prefill and 8 decode steps."""
    cfg, graphdef, params = _trained(*extra)
    ref, float_cache = _generate_logits(graphdef, params, False)
    np.testing.assert_allclose(ref, _logits(graphdef, params, EVAL), atol=1e-4)  # the decode path itself
    if extra == ("train.scan_layers=true",):  # the cache's own error, apart from the weights'
        cache_only, _ = _generate_logits(graphdef, params, True)
        per_position, _, top1 = _error(ref, cache_only)
        assert 0 < float(per_position.max()) < 0.02 and top1 >= 0.99, (float(per_position.max()), top1)
    both, int8_cache = _generate_logits(graphdef, quantize_params(cfg, params, "int8"), True)
    _within(ref, both, "int8", outliers=0.01 if "moe" in extra[0] else 0.0)
    # KV bytes: int8 codes + one f32 scale per (row, head, position) against f32: ratio 4 D / (D + 4).
    d = cfg.model.head_dim
    assert weight_bytes(float_cache) / weight_bytes(int8_cache) == pytest.approx(4 * d / (d + 4))  # 3.2 at D=16


def test_sharded_quantized_params_keep_layout_and_logits():
    cfg = load_config(overrides=TINY + ["mesh.fsdp=2", "mesh.tensor=2", "mesh.data=2"])
    _, graphdef, trained = _trained("train.scan_layers=true")
    one_device = _logits(graphdef, quantize_params(cfg, trained, "int4", GROUP), EVAL)
    mesh = build_mesh(cfg.mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_rules("default")):
        _, abstract = abstract_state(cfg)
        shardings = concrete_shardings(abstract, mesh)
        where = dict(nnx.to_flat_state(shardings))
        params = nnx.from_flat_state([(p, v.replace(jax.device_put(v.get_value(), where[p].get_value())))
                                      for p, v in nnx.to_flat_state(trained)])
        q = quantize_params(cfg, params, "int4", GROUP)
        for (path, fv), (_, qv) in zip(nnx.to_flat_state(params), nnx.to_flat_state(q)):
            w = qv.get_value()
            if not isinstance(w, QuantizedWeight):
                assert w is fv.get_value()
                continue
            assert w.q.sharding == fv.get_value().sharding, path
            spec = fv.get_value().sharding.spec  # scale: [*lead, G, *out], G replicated
            i0 = w.q.ndim - w.n_after - w.n_in
            assert tuple(w.scale.sharding.spec) == (*spec[:i0], None, *spec[i0 + w.n_in:]), path
        assert q["layers"]["attn"]["wq"].get_value().q.addressable_shards[0].data.size == \
            q["layers"]["attn"]["wq"].get_value().q.size // 4  # fsdp x tensor: a quarter per device
        sharded = _logits(graphdef, q, EVAL)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(one_device), atol=2e-4)


@pytest.mark.parametrize("model", ["bert-tiny", "transformer-tiny"])
def test_encoder_and_encoder_decoder(model):
    """Every linear weight of the other architectures too (cross-attention, the MLM dense and pooler, the
    tied table), and int8 logits close to float (untrained weights: E_mean only)."""
    from maxmodel.models.registry import build_model
    cfg = load_config(f"configs/models/{model}.yaml", ["model.vocab_size=512"])
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(build_model(cfg, nnx.Rngs(0)))
    q = quantize_params(cfg, params, "int8")
    names = _quantized_names(q)
    per_layer = {n.split(".", 1)[1] for n in names if "layers" in n}
    if model == "bert-tiny":
        assert {"mlm_dense", "pooler"} <= names and "embed.table" in names and per_layer >= {"attn.wq", "mlp.wo"}
    else:
        assert {"cross.wq", "cross.wk", "cross.wv", "cross.wo"} <= per_layer and "embed.table" in names
    tokens = EVAL[:2, :16]
    kwargs = {"encoder_inputs": EVAL[2:4, :16]} if model == "transformer-tiny" else {}
    run = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens, **kwargs))
    ref, out = run(params), run(q)
    _, mean, top1 = _error(ref, out)
    assert 0 < mean < 0.015 and top1 >= 0.9, (mean, top1)
