"""The decode-step attention kernels (models/decode_kernels.py) against the XLA path `kv_cache.attend`, on CPU:
the TPU paged-attention and GPU decode Pallas kernels in interpret mode, float32, for MHA / GQA / MQA, rows of
mixed lengths (an empty cache: a row of length 1 after the step), soft-cap; sharded over a mesh; which calls
fall back to XLA; `auto` per platform; and (libtpu) a layer's decode compiled for a v5p topology."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxmodel.config import load_config
from maxmodel.config.errors import ConfigError
from maxmodel.models import decode_kernels as dk
from maxmodel.models import kv_cache

H, D = 4, 128  # the TPU kernel takes head_dim in multiples of 128 lanes
LENGTHS = (0, 1, 20, 47, 9)  # tokens cached before the step; the last row is padding (position -1)
TOL = dict(atol=1e-5, rtol=1e-5)


def bf16_exact(rng, shape):
    """float32 values that bfloat16 holds exactly: the TPU kernel reads K/V as bfloat16, so on these inputs
    both paths compute the same numbers in float32 (and agree to float32 rounding)."""
    return jnp.asarray(rng.normal(size=shape), jnp.bfloat16).astype(jnp.float32)


def step(kv_heads, slots=48, lengths=LENGTHS, tokens=1, seed=0, dtype=jnp.float32, head_dim=D):
    """Arguments of one `attend` call: a cache with random keys everywhere (stale slots past a row's length
    must be ignored), one new token per row (or a chunk of `tokens`)."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    lengths = jnp.asarray(lengths, jnp.int32)
    cache = {"k": bf16_exact(rng, (b, kv_heads, slots, head_dim)).astype(dtype),
             "v": bf16_exact(rng, (b, kv_heads, slots, head_dim)).astype(dtype)}
    q = bf16_exact(rng, (b, tokens, H, head_dim)).astype(dtype)
    k, v = (bf16_exact(rng, (b, tokens, kv_heads, head_dim)).astype(dtype) for _ in range(2))
    positions = lengths[:, None] + jnp.arange(tokens)[None]
    positions = positions.at[-1].set(-1)
    return q, k, v, positions, lengths, cache


def run(impl, args, window=0, softcap=0.0):
    return jax.jit(lambda *a: dk.attend(impl, *a, window, window > 0, softcap))(*args)


def xla(args, window=0, softcap=0.0):
    return jax.jit(lambda *a: kv_cache.attend(*a, window, window > 0, softcap))(*args)


def assert_same(got, want):
    (out, cache), (want_out, want_cache) = got, want
    np.testing.assert_allclose(np.asarray(out[:-1]), np.asarray(want_out[:-1]), **TOL)  # the padding row's
    assert np.isfinite(np.asarray(out)).all()                                          # output is unused
    for name in want_cache:
        np.testing.assert_array_equal(np.asarray(cache[name]), np.asarray(want_cache[name]), err_msg=name)


@pytest.fixture
def traced(monkeypatch):
    """Which kernels the calls traced (so an equality cannot come from the XLA path)."""
    calls = []
    for name in ("_paged", "_gpu_decode"):
        real = getattr(dk, name)
        monkeypatch.setattr(dk, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    return calls


@pytest.mark.parametrize("impl,kernel", [("splash", "_paged"), ("flash", "_gpu_decode")])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_kernel_equals_xla_path(traced, impl, kernel, kv_heads):
    args = step(kv_heads)
    assert_same(run(impl, args), xla(args))
    assert traced == [kernel]


@pytest.mark.parametrize("impl", ["splash", "flash"])
def test_kernel_equals_xla_path_over_many_pages_and_key_splits(impl):
    """256 slots: two 128-token pages in one compute block (TPU); 16 key splits of 16 (GPU)."""
    args = step(2, slots=256, lengths=(0, 255, 130, 17, 3))
    assert_same(run(impl, args), xla(args))


def test_tpu_kernel_soft_cap(traced):
    args = step(2)
    assert_same(run("splash", args, softcap=2.0), xla(args, softcap=2.0))
    assert traced == ["_paged"]


def test_tpu_kernel_rounds_a_float32_cache_to_bfloat16():
    """Arbitrary float32 K/V: the TPU kernel reads them as bfloat16 (why `auto` keeps float32 caches on XLA)."""
    rng = np.random.default_rng(1)
    q, k, v, positions, lengths, cache = step(2)
    cache = {name: jnp.asarray(rng.normal(size=c.shape), jnp.float32) for name, c in cache.items()}
    args = (q, k, v, positions, lengths, cache)
    got, want = run("splash", args)[0][:-1], xla(args)[0][:-1]
    assert 1e-6 < float(jnp.max(jnp.abs(got - want))) < 5e-2


def test_sharded_kernels_equal_xla():
    """Rows over data × fsdp, kv heads over tensor (and one kv head, which `tensor` cannot split)."""
    from maxmodel.parallel.mesh import build_mesh
    from maxmodel.parallel.rules import mesh_rules
    cfg = load_config(overrides=["mesh.data=2", "mesh.fsdp=1", "mesh.tensor=2"])
    mesh = build_mesh(cfg.mesh, jax.devices()[:4])
    for kv_heads in (2, 1):
        args = step(kv_heads, lengths=(0, 1, 20, 47, 9, 3))
        want = xla(args)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_rules(cfg.mesh, mesh)):
            for impl in ("splash", "flash"):
                text = jax.jit(lambda *a: dk.attend(impl, *a, 0, False)).lower(*args).as_text()
                assert "shard_map" in text or "manual_computation" in text
                assert_same(run(impl, args), want)


FALLBACKS = {  # name: (attend arguments, window, soft-cap, kernels that fall back)
    "prefill_chunk": (dict(tokens=3), 0, 0.0, ("splash", "flash")),
    "sliding_window_ring": (dict(slots=16, lengths=(0, 1, 20, 47, 9)), 8, 0.0, ("splash", "flash")),
    "unaligned_slots": (dict(slots=40, lengths=(0, 1, 20, 39, 9)), 0, 0.0, ("splash", "flash")),
    "gpu_soft_cap": ({}, 0, 3.0, ("flash", "cudnn")),
    "tpu_head_dim_64": (dict(head_dim=64), 0, 0.0, ("splash",)),
}


@pytest.mark.parametrize("name", FALLBACKS)
def test_calls_the_kernels_do_not_take_run_the_xla_path(traced, name):
    options, window, softcap, impls = FALLBACKS[name]
    args = step(2, **options)
    want = xla(args, window, softcap)
    for impl in impls:
        got = run(impl, args, window, softcap)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert traced == []


def test_int8_cache_runs_the_xla_path(traced):
    q, k, v, positions, lengths, cache = step(2)
    kq, ks = kv_cache.quantize_heads(cache["k"])
    vq, vs = kv_cache.quantize_heads(cache["v"])
    args = (q, k, v, positions, lengths, {"k": kq, "v": vq, "k_scale": ks, "v_scale": vs})
    want = xla(args)
    for impl in ("splash", "flash", "auto"):
        for a, b in zip(jax.tree.leaves(run(impl, args)), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert traced == []


def test_auto_is_xla_on_cpu_and_the_kernel_per_platform(monkeypatch, traced):
    args = step(2)
    for a, b in zip(jax.tree.leaves(run("auto", args)), jax.tree.leaves(xla(args))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # CPU: exactly today's numbers
    assert traced == []
    pick = lambda dtype, softcap=0.0: dk.choose("auto", tokens=1, window=0, quantized=False, softcap=softcap,
                                                slots=64, head_dim=128, dtype=dtype)
    assert pick(jnp.bfloat16) == pick(jnp.float32) == "xla"
    monkeypatch.setattr(dk, "platform", lambda: "tpu")
    assert pick(jnp.bfloat16) == pick(jnp.bfloat16, softcap=5.0) == "tpu"
    assert pick(jnp.float32) == "xla"  # the kernel would round the cache to bfloat16
    monkeypatch.setattr(dk, "platform", lambda: "gpu")
    assert pick(jnp.bfloat16) == pick(jnp.float32) == "gpu" and pick(jnp.bfloat16, softcap=5.0) == "xla"
    assert dk.choose("xla", tokens=1, window=0, quantized=False, softcap=0.0, slots=64, head_dim=128,
                     dtype=jnp.bfloat16) == "xla"
    monkeypatch.setattr(dk, "platform", lambda: "tpu")
    assert dk.choose("auto", tokens=1, window=0, quantized=False, softcap=0.0, slots=64, head_dim=64,
                     dtype=jnp.bfloat16) == "xla"  # Mosaic needs head_dim in multiples of 128


def test_bad_impl_names_the_key():
    with pytest.raises(ConfigError, match="model.attention.impl"):
        dk.attend("paged", *step(2), 0, False)


def test_layer_decode_compiles_for_tpu_with_the_mosaic_kernel():
    """A layer's one-token decode (bfloat16 cache, GQA, `auto`) lowered for v5p-8 (data=2 × tensor=2) on this
    CPU host: `auto` picks the paged-attention kernel on the TPU mesh, and Mosaic compiles it."""
    pytest.importorskip("libtpu", reason="libtpu not installed: TPU ahead-of-time compile unavailable")
    from maxmodel.models.attention import Attention
    from maxmodel.parallel.mesh import build_mesh
    from maxmodel.parallel.rules import mesh_rules
    from maxmodel.train.aot import topology_devices
    devices, _ = topology_devices("v5p-8", 1)
    cfg = load_config(overrides=["model.d_model=512", "model.num_heads=8", "model.num_kv_heads=2",
                                 "model.head_dim=128", "mesh.data=2", "mesh.tensor=2"])
    mesh = build_mesh(cfg.mesh, devices)
    rules = mesh_rules(cfg.mesh, mesh)
    b, slots = 8, 256
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(Attention(cfg.model, nnx.Rngs(0), param_dtype=jnp.bfloat16))

    def decode(state, x, positions, lengths, cache):
        return nnx.merge(graphdef, state).decode(x, positions, lengths, cache)
    shard = lambda spec: jax.sharding.NamedSharding(mesh, spec)
    cache_spec = shard(jax.P(("data",), "tensor", None, None))
    abstract = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shard(jax.P())), state),
                jax.ShapeDtypeStruct((b, 1, 512), jnp.bfloat16, sharding=shard(jax.P("data"))),
                jax.ShapeDtypeStruct((b, 1), jnp.int32, sharding=shard(jax.P("data"))),
                jax.ShapeDtypeStruct((b,), jnp.int32, sharding=shard(jax.P("data"))),
                {n: jax.ShapeDtypeStruct((b, 2, slots, 128), jnp.bfloat16, sharding=cache_spec) for n in "kv"})
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        compiled = jax.jit(decode).lower(*abstract).compile()
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 1


@pytest.mark.parametrize("impl,kernel,atol", [("flash", "_gpu_decode", 1e-5), ("splash", "_paged", 3e-3)])
def test_model_decode_with_a_kernel_equals_xla(traced, impl, kernel, atol):
    """A 2-layer GQA model: a prefilled chunk (XLA either way), then one-token steps through the kernel give
    the XLA path's logits. (The TPU kernel reads the float32 cache as bfloat16: here 7e-4 apart, on logits ~0.5.)"""
    from maxmodel.config import load_config_args
    from maxmodel.models.registry import build_model
    small = ["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
             "model.head_dim=128", "model.d_ff=128", "model.vocab_size=97", "train.seq_len=128"]
    models = {}
    for name in ("xla", impl):
        with nnx.use_eager_sharding(False):
            models[name] = build_model(load_config_args(small + [f"model.attention.impl={name}"]), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, 97)
    n = jnp.array([7, 5, 1])
    logits = {}
    for name, model in models.items():
        cache = model.init_cache(3, 32)
        positions = jnp.where(jnp.arange(7)[None] < n[:, None], jnp.arange(7)[None], -1)
        _, cache = model.decode(tokens[:, :7], positions, jnp.zeros((3,), jnp.int32), cache)
        lengths, out = n, []
        for _ in range(3):
            h, cache = model.decode(jnp.take_along_axis(tokens, lengths[:, None], 1), lengths[:, None], lengths,
                                    cache)
            out.append(model.logits(h)[:, 0])
            lengths = lengths + 1
        logits[name] = jnp.stack(out)
    np.testing.assert_allclose(logits[impl], logits["xla"], atol=atol, rtol=0)
    assert traced and set(traced) == {kernel}


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_gpu_kernel_lowers_for_cuda_on_a_cpu_host():
    """The decode step lowered for CUDA under an abstract GPU mesh (no GPU here): `auto` picks the Pallas GPU
    kernel, and its Triton lowering accepts the blocks (powers of two), in bfloat16 and float32."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("data",), (jax.sharding.AxisType.Auto,), abstract_device=device)
    for dtype, slots in ((jnp.bfloat16, 4096), (jnp.float32, 48)):
        sd = jax.ShapeDtypeStruct
        args = (sd((4, 1, 8, 128), dtype), sd((4, 1, 2, 128), dtype), sd((4, 1, 2, 128), dtype),
                sd((4, 1), jnp.int32), sd((4,), jnp.int32), {n: sd((4, 2, slots, 128), dtype) for n in "kv"})
        with jax.sharding.use_abstract_mesh(mesh):
            text = jax.jit(lambda *a: dk.attend("auto", *a, 0, False)).trace(*args).lower(
                lowering_platforms=("cuda",)).as_text()
        assert text.count("xla.gpu.triton") == 1
