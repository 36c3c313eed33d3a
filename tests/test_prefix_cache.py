"""Prefix cache: a hit reproduces a cold prefill (logits and the greedy tokens after it), saved tokens are
counted, LRU eviction by bytes, the disk tier, invalidation on a weight swap, a chat's second turn."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_engine import VOCAB, tiny_engine

BLOCK = 4
TOL = 1e-6  # f32; a hit prefills fewer, differently chunked tokens than the cold run (measured: <= 1.5e-8)


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def prompt(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(3, VOCAB, n)]


def cache(engine, **kw):
    from maxmodel.inference.prefix_cache import PrefixCache
    return PrefixCache(engine, block_size=BLOCK, **kw)


def greedy(engine, rows, prompts, steps=4):
    """Insert each (row, logits) into slots 0.. and decode `steps` greedy tokens: tokens, logprobs [rows, steps+1]."""
    from maxmodel.inference.sampling import SamplingOptions, stack_params
    sp = stack_params([SamplingOptions(temperature=0.0)], 1)
    toks, lps = [], []
    for slot, ((row, logits), p) in enumerate(zip(rows, prompts)):
        out = engine.insert(row, logits, slot, p, sp)
        toks.append([int(out.tokens[0])]), lps.append([float(out.logprobs[0])])
    active = np.arange(engine.max_slots) < len(rows)
    for _ in range(steps):
        out = engine.step(active)
        for i in range(len(rows)):
            toks[i].append(int(out.tokens[i])), lps[i].append(float(out.logprobs[i]))
    return np.array(toks), np.array(lps)


def test_hit_matches_cold_prefill(engine):
    pc = cache(engine)
    a = prompt(0, 21)
    cold_row, cold_logits, _ = engine.prefill(a)
    _, miss_logits, _ = pc(a)
    assert (pc.counters["lookups"], pc.counters["hits"], pc.counters["blocks_stored"]) == (1, 0, 5)
    np.testing.assert_array_equal(np.asarray(miss_logits), np.asarray(cold_logits))  # same computation
    hit_row, hit_logits, _ = pc(a)
    assert pc.counters["hits"] == 1 and pc.counters["prefill_tokens_saved"] == 20  # 5 blocks, 1 token left
    np.testing.assert_allclose(np.asarray(hit_logits), np.asarray(cold_logits), rtol=0, atol=TOL)
    toks, lps = greedy(engine, [(hit_row, hit_logits), (cold_row, cold_logits)], [a, a])
    np.testing.assert_array_equal(toks[0], toks[1])
    np.testing.assert_allclose(lps[0], lps[1], rtol=0, atol=TOL)
    # A prompt sharing only a's first two blocks reuses exactly those (the hash chain stops at the change).
    b = a[:8] + [(t + 1 - 3) % (VOCAB - 3) + 3 for t in a[8:12]] + a[12:]
    _, b_logits, _ = pc(b)
    assert pc.counters["hits"] == 2 and pc.counters["prefill_tokens_saved"] == 28
    np.testing.assert_allclose(np.asarray(b_logits), np.asarray(engine.prefill(b)[1]), rtol=0, atol=TOL)


def test_lru_eviction_by_bytes(engine):
    probe = cache(engine)
    probe(prompt(1, 5))
    block_bytes = probe.counters["bytes"]
    assert block_bytes > 0 and probe.counters["blocks_stored"] == 1
    pc = cache(engine, capacity_bytes=2 * block_bytes)
    x, y, z = prompt(2, 5), prompt(3, 5), prompt(4, 5)
    pc(x), pc(y)
    assert pc.counters["bytes"] == 2 * block_bytes and pc.counters["evictions"] == 0
    pc(x)                                   # a hit: x is now the most recently used
    assert pc.counters["hits"] == 1
    pc(z)                                   # the third block: the least recently used (y) goes
    assert pc.counters["evictions"] == 1 and pc.counters["bytes"] == 2 * block_bytes
    pc(x)
    assert pc.counters["hits"] == 2         # x survived
    pc(y)
    assert pc.counters["hits"] == 2         # y was evicted: a miss


def test_disk_tier_round_trip(engine, tmp_path):
    probe = cache(engine)
    probe(prompt(5, 5))
    block_bytes = probe.counters["bytes"]
    pc = cache(engine, capacity_bytes=block_bytes, disk_dir=tmp_path, disk_bytes=1 << 30)
    a = prompt(6, 13)
    cold_logits = np.asarray(engine.prefill(a)[1])
    pc(a)                                   # 3 blocks: the first two spill to disk
    assert len(list(tmp_path.glob("*.kvblock.npz"))) == 2 and len(pc.memory) == 1
    _, logits, _ = pc(a)
    # Memory holds one block: each block promoted from disk pushes the previous one out, so all 3 come back.
    assert pc.counters["disk_hits"] == 3 and pc.counters["prefill_tokens_saved"] == 12
    np.testing.assert_allclose(np.asarray(logits), cold_logits, rtol=0, atol=TOL)
    engine.set_params(engine.params)        # a weight swap removes the files too
    assert not list(tmp_path.glob("*.kvblock.npz")) and pc.counters["disk_bytes"] == 0


def test_weight_swap_invalidates(engine):
    pc = cache(engine)
    a = prompt(7, 10)
    old_logits = np.asarray(pc(a)[1])
    old = engine.params
    try:
        engine.set_params(jax.tree.map(lambda x: x * 1.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, old))
        assert pc.counters["bytes"] == 0 and not pc.memory and pc.counters["invalidations"] == 1
        _, logits, _ = pc(a)
        assert pc.counters["hits"] == 0      # nothing stale reused
        np.testing.assert_array_equal(np.asarray(logits), np.asarray(engine.prefill(a)[1]))
        assert np.abs(np.asarray(logits) - old_logits).max() > 1e-3  # the swap matters: stale blocks would show
    finally:
        engine.set_params(old)


def test_chat_second_turn_reuses_first_answer(engine):
    from maxmodel.data.tokenizer import ByteTokenizer
    from maxmodel.inference.generator import Generator
    from maxmodel.inference.sampling import SamplingOptions
    opts = SamplingOptions(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    cached, cold = Generator(engine, ByteTokenizer()), Generator(engine, ByteTokenizer())
    pc = cache(engine)
    cached.attach_prefix_cache(pc)  # as load_engine(prefix_cache_gb=...) does
    p1 = prompt(8, 10)
    answer = cached.generate([p1], opts)[0].completions[0].token_ids
    p2 = p1 + answer + prompt(9, 5)                   # 21 tokens: the slot held p1 + answer[:-1] = 15
    saved = pc.counters["prefill_tokens_saved"]
    turn2 = cached.generate([p2], opts)[0].completions[0]
    assert pc.counters["prefill_tokens_saved"] - saved == 12 > len(p1)  # blocks of the answer were reused
    ref = cold.generate([p2], opts)[0].completions[0]
    assert turn2.token_ids == ref.token_ids
    assert cached.stats()["prefix_hits"] == 1
    np.testing.assert_allclose(turn2.logprobs, ref.logprobs, rtol=0, atol=TOL)


def test_sliding_window_reuses_only_what_the_ring_still_holds():
    # Local (window 6, a ring of 6 slots) and global layers alternate; blocks of 4.
    engine = tiny_engine("model.attention.sliding_window=6", "model.attention.global_every=2")
    pc = cache(engine)
    a = prompt(10, 21)
    cold = np.asarray(engine.prefill(a)[1])
    pc(a)  # the ring kept positions 15..20: blocks 3 (from 15) and 4 carry their local layers' part
    assert [e["ring_from"] for e in pc.memory.values()] == [4, 8, 12, 15, 16]
    _, hit, _ = pc(a)  # reuse 20: the next token sees 15..19, all held
    assert pc.counters["prefill_tokens_saved"] == 20
    np.testing.assert_allclose(np.asarray(hit), cold, rtol=0, atol=TOL)
    b = a[:13] + prompt(11, 8)  # shares blocks 0-2, whose local part was lost: no usable prefix
    _, b_logits, _ = pc(b)
    assert pc.counters["hits"] == 1
    np.testing.assert_allclose(np.asarray(b_logits), np.asarray(engine.prefill(b)[1]), rtol=0, atol=TOL)
    # Ignoring the window (reusing a's blocks 0-2 without their local part) would be wrong: the check matters.
    c = a[:13] + prompt(12, 1)
    pc.window = 0
    _, wrong, _ = pc(c)
    assert pc.counters["hits"] == 2 and pc.counters["prefill_tokens_saved"] == 32
    assert np.abs(np.asarray(wrong) - np.asarray(engine.prefill(c)[1])).max() > 1e-3
