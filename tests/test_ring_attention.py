"""Ring and all-gather context-parallel attention against dense attention, on 8 emulated CPU devices."""
import jax

try:  # must happen before JAX initialises its backend; a conftest may already have done it
    jax.config.update("jax_num_cpu_devices", 8)
except RuntimeError:
    pass

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from maxmodel.parallel.ring_attention import (
    allgather_attention,
    attention_mask,
    inverse_permutation,
    load_balance_permutation,
    reference_attention,
    ring_attention,
)

AXES = ("data", "stage", "fsdp", "sequence", "tensor", "expert")
B, L, H, KVH, D = 2, 1024, 4, 2, 16

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (emulated) devices")


def make_mesh(data=1, sequence=1, tensor=1):
    shape = (data, 1, 1, sequence, tensor, 1)
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def packed_batch(seed=0):
    """Rows holding several documents of random lengths, then padding (segment 0)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, L), np.int32)
    pos = np.zeros((B, L), np.int32)
    for b in range(B):
        start, doc = 0, 1
        while True:
            n = int(rng.integers(40, 400))
            if start + n > L - 50:  # leave some padding at the end of every row
                break
            seg[b, start:start + n] = doc
            pos[b, start:start + n] = np.arange(n)
            start, doc = start + n, doc + 1
    q = rng.normal(size=(B, L, H, D)).astype(np.float32)
    k = rng.normal(size=(B, L, KVH, D)).astype(np.float32)
    v = rng.normal(size=(B, L, KVH, D)).astype(np.float32)
    cot = rng.normal(size=(B, L, H, D)).astype(np.float32)  # fixed output cotangent for the gradient
    return q, k, v, seg, pos, cot


@pytest.fixture(scope="module")
def batch():
    return packed_batch()


@pytest.fixture(scope="module")
def reference(batch):
    q, k, v, seg, pos, cot = batch

    def loss(q, k, v):
        return jnp.sum(reference_attention(q, k, v, seg, seg, pos, pos) * cot)

    out = reference_attention(q, k, v, seg, seg, pos, pos)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return np.asarray(out), [np.asarray(g) for g in grads]


def rel_err(x, ref):
    return float(np.max(np.abs(np.asarray(x) - ref)) / np.max(np.abs(ref)))


def place(mesh, q, k, v, seg, pos, heads_on_tensor):
    batch_axis = "data" if mesh.shape["data"] > 1 else None
    head_axis = "tensor" if heads_on_tensor else None
    s4 = NamedSharding(mesh, P(batch_axis, "sequence", head_axis, None))
    s2 = NamedSharding(mesh, P(batch_axis, "sequence"))
    return [jax.device_put(a, s) for a, s in ((q, s4), (k, s4), (v, s4), (seg, s2), (pos, s2))]


LAYOUTS = {"seq4": {"sequence": 4}, "data2_seq4": {"data": 2, "sequence": 4},
           "data2_seq2_tensor2": {"data": 2, "sequence": 2, "tensor": 2}}
CASES = [(impl, layout, balanced)
         for impl in ("ring", "allgather") for layout in ("seq4", "data2_seq4") for balanced in (False, True)]
CASES += [("ring", "data2_seq2_tensor2", True)]


@pytest.mark.parametrize("impl,layout,balanced", CASES)
def test_matches_reference_with_gradients(batch, reference, impl, layout, balanced):
    q, k, v, seg, pos, cot = batch
    ref_out, ref_grads = reference
    mesh = make_mesh(**LAYOUTS[layout])
    fn = ring_attention if impl == "ring" else allgather_attention
    n = mesh.shape["sequence"]
    perm = load_balance_permutation(L, n) if balanced else np.arange(L)
    inv = inverse_permutation(perm)
    q, k, v, seg, pos, cot = (a[:, perm] for a in (q, k, v, seg, pos, cot))
    q, k, v, seg, pos = place(mesh, q, k, v, seg, pos, heads_on_tensor=mesh.shape["tensor"] > 1)

    def forward_and_grads(q, k, v, seg, pos):  # one program, one compile
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg, seg, pos, pos, mesh=mesh), q, k, v)
        return out, vjp(cot)

    compiled = jax.jit(forward_and_grads).lower(q, k, v, seg, pos).compile()
    hlo = compiled.as_text()
    # Ring: K/V (and, backward, dK/dV) move by collective-permute; all-gather: gather, then reduce-scatter.
    assert ("collective-permute" in hlo) == (impl == "ring")
    if impl == "allgather":
        assert "all-gather" in hlo and "reduce-scatter" in hlo
    out, grads = compiled(q, k, v, seg, pos)
    assert out.sharding.spec[1] == "sequence"
    out = np.asarray(out)[:, inv]
    assert rel_err(out, ref_out) < 1e-5
    assert np.all(out[np.asarray(seg)[:, inv] == 0] == 0.0)  # padding rows: zeros, not NaN
    for g, g_ref in zip(grads, ref_grads):
        g = np.asarray(g)[:, inv]
        assert np.all(np.isfinite(g))
        assert rel_err(g, g_ref) < 1e-5


def test_window_softcap_noncausal_and_cross_lengths():
    """Options beyond the causal default, and a query block shorter than the K/V sequence."""
    q, k, v, seg, pos, _ = packed_batch(seed=1)
    mesh = make_mesh(sequence=4)
    for causal in (False, True):
        opts = {"sliding_window": 100, "logit_softcap": 5.0, "scale": 0.3, "causal": causal}
        ref = reference_attention(q, k, v, seg, seg, pos, pos, **opts)
        out = jax.jit(lambda *a, opts=opts: ring_attention(*a, mesh=mesh, **opts))(
            q, k, v, seg, seg, pos, pos)
        assert rel_err(out, np.asarray(ref)) < 1e-5
    # Queries: the second half of each row; keys: the whole row (e.g. prefill of a continuation).
    half = slice(L // 2, L)
    ref = reference_attention(q[:, half], k, v, seg[:, half], seg, pos[:, half], pos)
    out = jax.jit(lambda *a: allgather_attention(*a, mesh=mesh))(
        q[:, half], k, v, seg[:, half], seg, pos[:, half], pos)
    assert rel_err(out, np.asarray(ref)) < 1e-5


def test_axis_of_size_one_and_odd_block_length():
    """Ring edge cases: sequence=1 (no hops) and sequence=2 with an odd local block (no half-block split)."""
    q, k, v, seg, pos, cot = (a[:, :126] for a in packed_batch(seed=2))
    ref_out, ref_vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, seg, seg, pos, pos), q, k, v)
    ref_grads = ref_vjp(cot)
    for sequence in (1, 2):
        mesh = make_mesh(sequence=sequence)

        def loss(q, k, v, mesh=mesh):
            out = ring_attention(q, k, v, seg, seg, pos, pos, mesh=mesh)
            return jnp.sum(out * cot), out
        grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        assert rel_err(out, np.asarray(ref_out)) < 1e-5
        for g, g_ref in zip(grads, ref_grads):
            assert rel_err(g, np.asarray(g_ref)) < 1e-5


def test_mask_semantics():
    seg = jnp.array([[1, 1, 2, 2, 0]])
    pos = jnp.array([[0, 1, 0, 1, 0]])
    m = np.asarray(attention_mask(seg, seg, pos, pos, causal=True))[0]
    expected = np.array([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [0, 0, 1, 0, 0],
                         [0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 0]], bool)  # padding sees nothing and is seen by nothing
    np.testing.assert_array_equal(m, expected)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_load_balance_permutation_equalises_causal_work(n):
    seq = 64 * n
    perm = load_balance_permutation(seq, n)
    assert sorted(perm.tolist()) == list(range(seq))
    x = np.arange(seq) * 10
    np.testing.assert_array_equal(x[perm][inverse_permutation(perm)], x)
    # Visible causal pairs per shard: sum over the shard's queries of (position + 1).
    work = (perm + 1).reshape(n, -1).sum(axis=1)
    assert np.all(work == work[0])
    natural = (np.arange(seq) + 1).reshape(n, -1).sum(axis=1)
    assert n == 1 or natural[-1] > natural[0]  # without the reorder the work is unequal
    # Shard i holds chunk i then chunk 2n-1-i.
    c = seq // (2 * n)
    np.testing.assert_array_equal(perm[:c], np.arange(c))
    np.testing.assert_array_equal(perm[c:2 * c], np.arange((2 * n - 1) * c, 2 * n * c))


@pytest.mark.parametrize("n", [2, 4, 8])
def test_zigzag_halves_the_busiest_devices_block_work(n):
    """Count the (query half, key half) pairs the ring kernel computes per device (it skips pairs with no
    visible entry) for one causal document: zigzag gives every device 2n+1, natural order up to 4n-1."""
    seq = 16 * n
    half = seq // (2 * n)

    def work_per_device(perm):
        pos = perm[None].astype(np.int32)
        seg = np.ones_like(pos)
        mask = np.asarray(attention_mask(seg, seg, pos, pos, causal=True))[0]
        halves = mask.reshape(2 * n, half, 2 * n, half).any(axis=(1, 3))  # [query half, key half]
        return halves.reshape(n, 2, 2 * n).sum(axis=(1, 2))

    balanced = work_per_device(load_balance_permutation(seq, n))
    natural = work_per_device(np.arange(seq))
    assert np.all(balanced == 2 * n + 1)
    assert natural.max() == 4 * n - 1 and natural.sum() == balanced.sum()


def test_bad_inputs_raise_clear_errors():
    q, k, v, seg, pos, _ = packed_batch()
    with pytest.raises(ValueError, match="seq_len=100 must be divisible by 2 \\* num_shards=8"):
        load_balance_permutation(100, 4)
    mesh = make_mesh(sequence=8)
    with pytest.raises(ValueError, match="q length 1020 is not divisible by mesh axis sequence=8"):
        ring_attention(q[:, :1020], k[:, :1020], v[:, :1020], seg[:, :1020], seg[:, :1020],
                       pos[:, :1020], pos[:, :1020], mesh=mesh)
    with pytest.raises(ValueError, match="num_heads=4 divisible by num_kv_heads=3"):
        ring_attention(q, np.zeros((B, L, 3, D)), np.zeros((B, L, 3, D)), seg, seg, pos, pos, mesh=mesh)
    with pytest.raises(ValueError, match="mesh axis 'context' not in mesh axes"):
        ring_attention(q, k, v, seg, seg, pos, pos, mesh=mesh, axis_name="context")


@pytest.mark.parametrize("impl", ["ring", "allgather"])
def test_context_parallel_training_exits_0_and_prints_its_sample(impl, tiny_overrides, capsys):
    """`maxmodel train` on data x tensor x sequence with the default run.sample_tokens (48): the end-of-run
    sample's buffer ("The " in bytes, BOS and 48 tokens: 53 positions) is padded to fit sequence=2."""
    from maxmodel.cli import main as cli_main
    overrides = [o for o in tiny_overrides if not o.startswith("run.sample_tokens")]
    assert cli_main(["train", *overrides, "data.source=builtin", "data.tokenizer=bytes", "train.seq_len=64", f"run.name={impl}",
                     "train.steps=2", "checkpoint.enabled=false", "mesh.data=2", "mesh.tensor=2",
                     "mesh.sequence=2", f"model.attention.context_parallel={impl}"]) == 0
    captured = capsys.readouterr()
    sample = [line for line in captured.out.splitlines() if line.startswith("sample (greedy): The ")]
    assert len(sample) == 1, captured.out + captured.err
