"""The generation engine against the plain forward pass: cached decoding, greedy rollouts, continuous
batching, chunked prefill, compile counts, weight swaps, shardings, prompt logprobs and finishing rules."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_engine import build_engine

from maxmodel.config import load_config_args
from maxmodel.data.tokenizer import ByteTokenizer
from maxmodel.inference.batcher import Batcher
from maxmodel.inference.sampling import SamplingOptions
from maxmodel.models.registry import build_model

SMALL = ["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=128",
         "model.vocab_size=260", "model.max_seq_len=64", "train.seq_len=32"]


@pytest.mark.parametrize("extra", [
    [], ["model.num_kv_heads=4"], ["model.num_kv_heads=1"], ["model.attention.sliding_window=4"],
    ["model.attention.sliding_window=4", "model.attention.global_every=2"],
    ["model.attention.sliding_window=4", "model.attention.global_every=2", "train.scan_layers=false"],
    ["model.moe.num_experts=4", "model.moe.top_k=2"],
    ["model.moe.num_experts=4", "model.moe.every=2", "model.moe.first_dense_layers=2"],
    ["model.attention.logit_softcap=5", "model.final_logit_softcap=3", "model.post_norms=true",
     "model.norm_plus_one=true", "model.embed_scale=true", "model.attention.query_pre_attn_scalar=8"],
], ids=["gqa", "mha", "mqa", "window", "local_global", "local_global_unrolled", "moe", "moe_groups", "gemma2"])
def test_cached_decoding_equals_the_full_forward_pass(extra):
    """Rows of different prompt lengths (padding in the prefill chunk), a prefill longer than a window ring,
    single-token steps, then a 3-token chunk (as speculative verification writes): every logit equals the
    plain forward pass at that position."""
    cfg = load_config_args(SMALL + ["model.num_layers=4", "model.vocab_size=97"] + extra)
    with nnx.use_eager_sharding(False):
        model = build_model(cfg, nnx.Rngs(0))
    b, total, prompt = 3, 20, 7
    tokens = jax.random.randint(jax.random.key(1), (b, total), 0, 97)
    full = model(tokens)
    cache = model.init_cache(b, 32, spare=2)
    n = jnp.array([7, 5, 7])
    positions = jnp.where(jnp.arange(prompt)[None] < n[:, None], jnp.arange(prompt)[None], -1)
    h, cache = model.decode(tokens[:, :prompt], positions, jnp.zeros((b,), jnp.int32), cache)
    valid = (positions >= 0)[..., None]
    np.testing.assert_allclose(jnp.where(valid, model.logits(h), 0), jnp.where(valid, full[:, :prompt], 0),
                               atol=1e-5, rtol=0)
    lengths = n
    for _ in range(10):
        h, cache = model.decode(jnp.take_along_axis(tokens, lengths[:, None], 1), lengths[:, None], lengths, cache)
        np.testing.assert_allclose(model.logits(h)[:, 0], jnp.take_along_axis(full, lengths[:, None, None], 1)[:, 0],
                                   atol=1e-5, rtol=0)
        lengths = lengths + 1
    idx = lengths[:, None] + jnp.arange(3)[None]
    h, cache = model.decode(jnp.take_along_axis(tokens, idx, 1), idx, lengths, cache)
    np.testing.assert_allclose(model.logits(h), jnp.take_along_axis(full, idx[..., None], 1), atol=1e-5, rtol=0)


def make_engine(extra=(), devices=1, mesh_args=("mesh.data=1",), seed=0, **options):
    opts = {"max_slots": 4, "max_len": 64, "prefill_buckets": (8, 16), **options}
    return build_engine(SMALL + list(mesh_args) + [f"train.seed={seed}"] + list(extra), devices, **opts)


@pytest.fixture(scope="module")
def engine():
    return make_engine()


@pytest.fixture
def batcher(engine):
    return Batcher(engine, ByteTokenizer())


def forward(engine, seq):
    """Plain forward-pass logits [len(seq), V] of one sequence, over a fixed 64-token buffer (one compile per
    engine: the causal mask keeps the padding after `seq` out of its logits)."""
    buf = np.zeros((1, 64), np.int32)
    buf[0, :len(seq)] = seq
    return engine.logits_of(buf)[0, :len(seq)]


def argmax_rollout(engine, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(jnp.argmax(forward(engine, seq)[-1])))
    return seq[len(prompt):]


PROMPTS = [list(np.random.default_rng(0).integers(3, 259, n)) for n in (5, 11, 19, 3, 8)]  # 19 > 16: chunked
GREEDY = SamplingOptions(max_new_tokens=6, temperature=0.0, ignore_eos=True)


def test_greedy_equals_the_argmax_rollout_of_the_forward_pass(engine, batcher):
    """Five prompts in four slots (one waits, then joins), one of them longer than the largest prefill
    bucket (chunked prefill)."""
    outs = batcher.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.completions[0].token_ids == argmax_rollout(engine, prompt, 6)
        assert out.completions[0].finish_reason == "length"


def test_compiled_once_per_prefill_bucket(engine, batcher):
    before = dict(engine.traces)
    batcher.generate([p[:4] for p in PROMPTS] + [PROMPTS[2] * 2], GREEDY)
    prefills = {k for k in engine.traces if k[0] == "prefill"}
    assert prefills <= {("prefill", 8, False), ("prefill", 16, False)}
    assert engine.traces[("step", 0)] == 1 and engine.traces[("insert", 0)] == 1
    assert {k: v for k, v in engine.traces.items() if k in before} == before  # nothing recompiled


def test_requests_decoded_together_equal_each_decoded_alone(engine, batcher):
    opts = [SamplingOptions(max_new_tokens=n, temperature=t, top_p=p, seed=s, ignore_eos=True)
            for n, t, p, s in [(7, 0.0, 1.0, 0), (4, 1.0, 1.0, 1), (9, 0.8, 0.9, 2), (5, 1.3, 1.0, 3), (6, 1.0, 0.5, 4)]]
    together = batcher.generate(PROMPTS, opts)
    for prompt, opt, out in zip(PROMPTS, opts, together):
        alone = batcher.generate([prompt], [opt])[0]
        assert alone.completions[0].token_ids == out.completions[0].token_ids
        np.testing.assert_allclose(alone.completions[0].logprobs, out.completions[0].logprobs, atol=1e-5)


def test_n_samples_share_one_prefill_and_differ(engine, batcher):
    opt = SamplingOptions(max_new_tokens=8, temperature=1.0, seed=7, n=3, ignore_eos=True)
    before = batcher.counters["prompt_tokens"]
    out = batcher.generate([PROMPTS[1]], opt)[0]
    assert batcher.counters["prompt_tokens"] - before == len(PROMPTS[1])  # one prefill for three samples
    seqs = [tuple(c.token_ids) for c in out.completions]
    assert len(set(seqs)) == 3
    single = batcher.generate([PROMPTS[1]], SamplingOptions(max_new_tokens=8, temperature=1.0, seed=7,
                                                            ignore_eos=True))[0]
    assert single.completions[0].token_ids == list(seqs[0])  # sample 0 uses the request's own seed


def test_echo_gives_the_forward_pass_prompt_logprobs(engine, batcher):
    prompt = PROMPTS[2]  # two prefill chunks
    out = batcher.generate([prompt], SamplingOptions(max_new_tokens=1, temperature=0.0, echo=True, logprobs=2))[0]
    ref = jax.nn.log_softmax(forward(engine, prompt), axis=-1)
    expect = [float(ref[t - 1, prompt[t]]) for t in range(1, len(prompt))]
    assert out.prompt_logprobs[0] is None
    np.testing.assert_allclose(out.prompt_logprobs[1:], expect, atol=1e-5)
    top = out.prompt_top_logprobs[3]
    assert [i for i, _ in top] == list(np.argsort(-np.asarray(ref[2]))[:2])


def test_stop_tokens_stop_strings_and_lengths(engine):
    tok = ByteTokenizer()
    ref = argmax_rollout(engine, PROMPTS[0], 8)
    b = Batcher(engine, tok, eos_ids=(ref[3],))
    out = b.generate([PROMPTS[0]], SamplingOptions(max_new_tokens=8, temperature=0.0))[0].completions[0]
    assert out.token_ids == ref[:4] and out.finish_reason == "stop"  # EOS kept in the ids, not in the text
    assert out.text == tok.decode(ref[:3])
    text = tok.decode(ref)
    stop = text[2:4] if len(text) >= 4 else None
    if stop and stop not in text[:2]:
        out = Batcher(engine, tok).generate([PROMPTS[0]], SamplingOptions(max_new_tokens=8, temperature=0.0,
                                                                          stop=[stop], ignore_eos=True))[0]
        assert out.completions[0].text == text[:text.index(stop)]
        assert out.completions[0].finish_reason == "stop"
    long = [5] * 60  # 60 of max_len 64: only 4 tokens fit
    out = Batcher(engine, tok).generate([long], SamplingOptions(max_new_tokens=50, temperature=0.0, ignore_eos=True))[0]
    assert len(out.completions[0].token_ids) == 4 and out.completions[0].finish_reason == "length"
    with pytest.raises(ValueError, match="prompt"):
        Batcher(engine, tok).submit([5] * 64, GREEDY)


def test_cpu_decode_layout_keeps_the_models_logits_and_gives_its_weights_back(engine):
    """On XLA:CPU the engine stores the untied head [vocab, d_model], joins each layer's q/k/v and up/gate
    weights and stores them and the output projections [out, in] (engine.decode_layout); its logits equal the
    model's own forward pass with the weights as given, and `params` hands those weights back unchanged."""
    given = engine.params
    assert engine.run_params["head"][...].shape == given["head"][...].shape[::-1]
    assert nnx.merge(engine.graphdef, engine.run_params).head_vocab_major
    run = {path: v.get_value() for path, v in nnx.to_flat_state(engine.run_params)}
    joined = {str(path[-2]) for path in run if path[-1] == "fused_w"}
    assert joined == {"attn", "mlp"}  # q/k/v and up/gate stored as one weight each (layers.fuse_projections)
    d, given_flat = engine.cfg.model.d_model, {path: v.get_value() for path, v in nnx.to_flat_state(given)}
    for path, value in run.items():
        if path[-1] == "fused_w":
            assert value.shape[-1] == d  # [.., out, in]
        if path[-1] == "wo":  # [.., d_model, heads x head_dim] and [.., d_model, d_ff]
            assert value.shape[-2] == d and value.ndim == given_flat[path].ndim - (path[-2] == "attn")
    assert {str(path[-2]) for path in run if path[-1] == "wo"} == {"attn", "mlp"}
    tokens = np.asarray([PROMPTS[1][:8], PROMPTS[2][:8]], np.int32)
    with engine.context():
        plain = nnx.merge(engine._graphdef_given, given)(jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(engine.logits_of(tokens)), np.asarray(plain), rtol=1e-6, atol=1e-6)
    engine.set_params(given)
    for a, b in zip(jax.tree.leaves(engine.params), jax.tree.leaves(given)):
        assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))


def test_weights_swap_in_place_without_recompiling(engine, batcher):
    other = make_engine(seed=1)
    before = dict(engine.traces)
    old = engine.params
    engine.set_params(other.params)
    try:
        out = batcher.generate([PROMPTS[0]], GREEDY)[0]
        assert out.completions[0].token_ids == argmax_rollout(other, PROMPTS[0], 6)
    finally:
        engine.set_params(old)
    assert dict(engine.traces) == before
    with pytest.raises(ValueError, match="params"):
        engine.set_params(jax.tree.map(lambda x: x[..., :1], old))


def test_sharded_engine_equals_one_device(engine):
    """8 devices: cache rows over data x fsdp, kv heads and weights over tensor: same greedy tokens."""
    sharded = make_engine(devices=8, mesh_args=("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    sharded.set_params(jax.device_put(engine.params, jax.tree.map(lambda x: x.sharding, sharded.params)))
    spec = sharded.state.cache["layers"][0]["k"].sharding.spec
    assert spec[1] == ("data", "fsdp", "expert") or spec[1] == ("data", "fsdp") and spec[2] == "tensor"
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[4]]  # one prefill bucket: fewer compiles on 8 devices
    outs = Batcher(sharded, ByteTokenizer()).generate(prompts, GREEDY)
    ref = Batcher(engine, ByteTokenizer()).generate(prompts, GREEDY)
    assert [o.completions[0].token_ids for o in outs] == [o.completions[0].token_ids for o in ref]


def test_a_cancelled_request_frees_its_slots(engine):
    b = Batcher(engine, ByteTokenizer())
    h = b.submit(PROMPTS[0], SamplingOptions(max_new_tokens=40, temperature=0.0, n=2, ignore_eos=True))
    b.iteration()
    assert b.stats()["active_slots"] == 2
    h.cancel()
    b.iteration()
    assert b.stats()["active_slots"] == 0 and h.done()
