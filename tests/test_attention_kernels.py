"""The fused attention kernels (models/attention_kernels.py) against the XLA path, on CPU: Pallas kernels in
interpret mode, values and gradients at float32 (1e-5), for every mask kind they take; then inside the model
on a sharded mesh, and how `model.attention.impl` is chosen and refused."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxmodel.config import load_config
from maxmodel.config.errors import ConfigError
from maxmodel.models import attention_kernels as kernels
from maxmodel.models.attention import attention_mask, dot_product_attention

B, L, H, D = 2, 256, 4, 16
BLOCK = 128  # two blocks each way: the block-sparse skipping is exercised


def packed(kv_heads, seed=0):
    """Rows of several documents (positions restart) and trailing padding (segment 0)."""
    rng = np.random.default_rng(seed)
    seg, pos = np.zeros((B, L), np.int32), np.zeros((B, L), np.int32)
    for b in range(B):
        start, doc = 0, 1
        while (n := int(rng.integers(30, 120))) + start <= L - 20:
            seg[b, start:start + n], pos[b, start:start + n] = doc, np.arange(n)
            start, doc = start + n, doc + 1
        pos[b, start:] = np.arange(L - start)
    q = rng.normal(size=(B, L, H, D)).astype(np.float32)
    k = rng.normal(size=(B, L, kv_heads, D)).astype(np.float32)
    v = rng.normal(size=(B, L, kv_heads, D)).astype(np.float32)
    cot = rng.normal(size=(B, L, H, D)).astype(np.float32)
    return q, k, v, jnp.asarray(seg), jnp.asarray(pos), cot


def xla(q, k, v, seg, pos, *, causal, window, softcap):
    return dot_product_attention(q, k, v, attention_mask(seg, seg, pos, pos, causal, window), softcap)


def value_and_grads(fn, q, k, v, cot):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(cot))


def assert_same(got, want):
    for g, w, name in zip(got, want, ("output", "dq", "dk", "dv")):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5, err_msg=name)


# name: (kv heads, causal, window, soft-cap)
MASKS = {
    "gqa_causal_packed": (2, True, 0, 0.0),
    "mha": (4, True, 0, 0.0),
    "mqa": (1, True, 0, 0.0),
    "sliding_window": (2, True, 48, 0.0),
    "softcap": (2, True, 0, 5.0),
    "bidirectional": (2, False, 0, 0.0),
}
FLASH = ("gqa_causal_packed", "mha", "mqa", "bidirectional")  # no windows or soft-caps in the Triton kernel


@pytest.mark.parametrize("impl,mask", [("splash", m) for m in MASKS] + [("flash", m) for m in FLASH])
def test_kernel_equals_xla(impl, mask):
    kv_heads, causal, window, softcap = MASKS[mask]
    q, k, v, seg, pos, cot = packed(kv_heads)
    want = value_and_grads(jax.jit(functools.partial(xla, seg=seg, pos=pos, causal=causal, window=window,
                                                     softcap=softcap)), q, k, v, cot)
    fused = functools.partial(kernels.fused_attention, impl, segment_ids=seg, causal=causal, window=window,
                              softcap=softcap, block_q=BLOCK, block_kv=BLOCK)
    got = value_and_grads(jax.jit(lambda q, k, v: fused(q, k, v)), q, k, v, cot)
    assert_same(got, want)


def test_splash_alternating_windows_in_a_scan():
    """Gemma 2's stack: a traced per-layer window (local 48, then global) selects the kernel's static mask."""
    q, k, v, seg, pos, cot = packed(2)
    windows = jnp.asarray([48, 0, 48])

    def stack(attend):
        def run(q, k, v):
            def layer(x, w):
                return attend(x, k, v, w) + x, None
            return jax.lax.scan(layer, q, windows)[0]
        return jax.jit(run)

    ref = stack(lambda x, k, v, w: xla(x, k, v, seg, pos, causal=True, window=w, softcap=0.0))
    fused = stack(lambda x, k, v, w: kernels.fused_attention("splash", x, k, v, seg, causal=True, window=w,
                                                             softcap=0.0, block_q=BLOCK, block_kv=BLOCK,
                                                             local_width=48))
    assert_same(value_and_grads(fused, q, k, v, cot), value_and_grads(ref, q, k, v, cot))


@pytest.mark.parametrize("window", [0, 48])
def test_cudnn_call_masks_like_xla(window):
    """cuDNN needs a GPU; the same `jax.nn.dot_product_attention` call on its XLA implementation checks the
    document mask, causality and window handed to it."""
    q, k, v, seg, pos, cot = packed(2)
    got = kernels._cudnn(q, k, v, seg, causal=True, window=window, implementation="xla")
    np.testing.assert_allclose(got, xla(q, k, v, seg, pos, causal=True, window=window, softcap=0.0), atol=1e-5)


def test_sharded_splash_equals_unsharded():
    """Batch over data × fsdp, heads over tensor (and one kv head with two head shards: each device slices
    the kv head its queries read)."""
    from maxmodel.parallel.mesh import build_mesh
    from maxmodel.parallel.rules import mesh_rules

    for kv_heads in (2, 1):
        q, k, v, seg, pos, cot = packed(kv_heads)
        run = lambda q, k, v: kernels.fused_attention("splash", q, k, v, seg, causal=True, window=0,
                                                      softcap=0.0, block_q=BLOCK, block_kv=BLOCK)
        grads = jax.jit(functools.partial(value_and_grads, run))  # the whole vjp under jit, as in a train step
        want = grads(q, k, v, cot)
        cfg = load_config(overrides=["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
        mesh = build_mesh(cfg.mesh, jax.devices()[:8])
        with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_rules(cfg.mesh, mesh)):
            got = grads(q, k, v, cot)
            text = jax.jit(run).lower(q, k, v).as_text()
        assert "shard_map" in text or "manual_computation" in text
        assert_same(got, want)


@pytest.fixture
def splash_calls(monkeypatch):
    """How often the model traced the splash kernel (so an equality cannot come from the XLA path)."""
    calls = []
    real = kernels._splash
    monkeypatch.setattr(kernels, "_splash", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_model_trains_the_same_with_splash_on_eight_devices(splash_calls):
    """The tiny model's train step (scanned layers, remat, GQA) with splash on data=2 × fsdp=2 × tensor=2:
    the losses and gradient norms of the 1-device XLA step."""
    from test_train_step import run_steps

    rows = ["train.seq_len=128"]  # splash's blocks are multiples of 128
    reference = run_steps(rows, jax.devices()[:1], steps=2)
    splash = run_steps(rows + ["model.attention.impl=splash", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
                       jax.devices(), steps=2)
    assert splash_calls
    np.testing.assert_allclose(splash, reference, rtol=1e-5)


def test_model_alternating_local_global_with_splash(splash_calls):
    from test_train_step import run_steps

    gemma = ["train.seq_len=128", "model.attention.sliding_window=40", "model.attention.global_every=2", "model.attention.logit_softcap=20"]
    reference = run_steps(gemma, jax.devices()[:1], steps=2)
    np.testing.assert_allclose(run_steps(gemma + ["model.attention.impl=splash"], jax.devices()[:1], steps=2),
                               reference, rtol=1e-5)
    assert len(splash_calls) >= 2  # the local and the global mask


def test_auto_picks_xla_on_cpu_and_kernels_per_platform(monkeypatch):
    features = dict(causal=True, window=False, softcap=0.0, prefix=False, dtype=jnp.float32)
    assert kernels.choose("auto", **features) == "xla"
    monkeypatch.setattr(kernels, "platform", lambda: "tpu")
    assert kernels.choose("auto", **features) == "splash"
    assert kernels.choose("auto", **{**features, "prefix": True}) == "xla"
    monkeypatch.setattr(kernels, "platform", lambda: "gpu")
    assert kernels.choose("auto", **{**features, "dtype": jnp.bfloat16}) == "cudnn"
    assert kernels.choose("auto", **features) == "flash"
    assert kernels.choose("auto", **{**features, "softcap": 30.0}) == "xla"
    assert kernels.choose("auto", **{**features, "window": True}) == "xla"


@pytest.mark.parametrize("overrides,needle", [
    (["model.attention.impl=flash", "model.attention.sliding_window=64"], "sliding windows"),
    (["model.attention.impl=cudnn", "model.attention.logit_softcap=30"], "logit_softcap"),
    (["model.attention.impl=cudnn"], "bfloat16"),
    (["model.attention.impl=splash", "train.objective=prefix_lm"], "prefix"),
    (["model.attention.impl=splash", "mesh.sequence=2"], "mesh.sequence"),
    (["model.attention.impl=pallas"], "is not one of"),
])
def test_bad_kernel_choices_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match="model.attention.impl") as e:
        load_config(overrides=overrides)
    assert needle in str(e.value)
