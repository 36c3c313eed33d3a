"""Beam search against a brute-force oracle and a plain numpy beam search over the no-cache forward pass;
best-of-N keeps the best of the samples the same seeds give with n = N."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from tiny_engine import VOCAB, tiny_engine

EOS = 1
PROMPT = [3, 7, 4, 4, 6]
DEPTH = 4  # the table holds every continuation of up to DEPTH tokens


@pytest.fixture(scope="module")
def engine():
    """The shared engine with its weights x3: sharper, context-dependent distributions, so that beams diverge,
    finish at EOS at different lengths, and a wrong cache reorder changes the result."""
    import jax
    import jax.numpy as jnp
    engine = tiny_engine()
    old = engine.params
    engine.set_params(jax.tree.map(lambda x: x * 3 if jnp.issubdtype(x.dtype, jnp.floating) else x, old))
    yield engine
    engine.set_params(old)


@pytest.fixture(scope="module")
def table(engine):
    """log_softmax of the plain forward pass for every continuation: lp[(t1..t_{DEPTH-1})][step] [V], from one
    batched call over all V^(DEPTH-1) continuations (causal: a row's position P-1+s sees only its first s)."""
    rows = np.array([PROMPT + list(c) for c in itertools.product(range(VOCAB), repeat=DEPTH - 1)], np.int32)
    logits = np.asarray(engine.logits_of(rows), np.float64)[:, len(PROMPT) - 1:]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return {tuple(r[len(PROMPT):]): logp[i] for i, r in enumerate(rows)}


def next_logp(table, prefix):
    """[V] log-probabilities of the token after `prefix` (generated tokens so far)."""
    key = tuple(prefix) + (0,) * (DEPTH - 1 - len(prefix))
    return table[key][len(prefix)]


def seq_score(table, tokens, alpha):
    return sum(next_logp(table, tokens[:i])[t] for i, t in enumerate(tokens)) / len(tokens) ** alpha


def reference_beam(table, num_beams, max_new, alpha):
    """HF's beam search written out plainly over the table (no caches, no slots)."""
    beams, done = [((), 0.0)], []

    def bound(total, cur):
        return total / (max_new if alpha > 0 else cur + 1) ** alpha
    for t in range(max_new):
        cands = sorted(((total + next_logp(table, seq)[v], seq + (v,)) for seq, total in beams
                        for v in range(VOCAB)), key=lambda c: -c[0])[:2 * num_beams]
        running = []
        for rank, (total, seq) in enumerate(cands):
            if seq[-1] == EOS:
                if rank < num_beams:
                    done.append((total / len(seq) ** alpha, seq))
            else:
                running.append((seq, total))
            if len(running) == num_beams:
                break
        done = sorted(done, key=lambda d: -d[0])[:num_beams]
        beams = running
        if t < max_new - 1 and running and len(done) == num_beams and done[-1][0] >= bound(running[0][1], t + 1):
            beams = []
            break
    done = sorted(done + [(total / len(seq) ** alpha, seq) for seq, total in beams], key=lambda d: -d[0])
    return [(list(seq), score) for score, seq in done[:num_beams]]


@pytest.mark.parametrize("alpha", [1.0, -1.0])
def test_exhaustive_width_finds_the_true_best(engine, table, alpha):
    from maxmodel.inference.beam import beam_search
    # Every complete hypothesis of up to 3 new tokens (ends at EOS, or has all 3; EOS only last): the true best
    # under sum logprob / len ** alpha.
    seqs = [s for n in (1, 2, 3) for s in itertools.product(range(VOCAB), repeat=n)
            if EOS not in s[:-1] and (s[-1] == EOS or n == 3)]
    scores = {s: seq_score(table, s, alpha) for s in seqs}
    best = max(scores, key=scores.get)
    out = beam_search(engine, PROMPT, num_beams=VOCAB ** 2, max_new_tokens=3, length_penalty=alpha, eos_ids=[EOS])
    assert out[0][0] == list(best) and out[0][1] == pytest.approx(scores[best], abs=1e-5)
    for tokens, score in out:  # every returned hypothesis carries its true score
        assert score == pytest.approx(scores[tuple(tokens)], abs=1e-5)
    assert [s for _, s in out] == sorted((s for _, s in out), reverse=True)


@pytest.mark.parametrize("num_beams,alpha", [(2, 1.0), (2, -0.5), (3, 2.0)])
def test_matches_reference_beam_search(engine, table, num_beams, alpha):
    from maxmodel.inference.beam import beam_search
    ref = reference_beam(table, num_beams, DEPTH, alpha)
    out = beam_search(engine, PROMPT, num_beams, DEPTH, length_penalty=alpha, eos_ids=[EOS])
    assert [t for t, _ in out] == [t for t, _ in ref]
    np.testing.assert_allclose([s for _, s in out], [s for _, s in ref], rtol=0, atol=1e-5)


def test_best_of_keeps_the_best_sample(engine):
    from maxmodel.data.tokenizer import ByteTokenizer
    from maxmodel.inference.batcher import Batcher
    from maxmodel.inference.sampling import SamplingOptions
    batcher = Batcher(engine, ByteTokenizer())

    def opts(seed, **kw):
        return SamplingOptions(max_new_tokens=5, temperature=1.0, ignore_eos=True, seed=seed, **kw)

    def scorer(prompt_ids, o):  # distinct for distinct sequences; unrelated to likelihood
        return sum(t * VOCAB ** i for i, t in enumerate(o.token_ids)) + len(prompt_ids)
    # A seed whose most likely sample and best-scored sample are not sample 0 (else "keep the first" passes).
    for seed in range(20):
        samples = batcher.generate([PROMPT], opts(seed, n=4))[0].completions
        by_lp = int(np.argmax([o.mean_logprob for o in samples]))
        by_score = int(np.argmax([scorer(PROMPT, o) for o in samples]))
        if by_lp and by_score:
            break
    else:
        pytest.fail("no seed with the best sample past index 0")
    best = batcher.generate([PROMPT], opts(seed, n=1, best_of=4))[0].completions
    assert len(best) == 1 and best[0].index == 0 and best[0].token_ids == samples[by_lp].token_ids
    h = batcher.submit(PROMPT, opts(seed, n=1, best_of=4), scorer=scorer)
    batcher.run_until_idle()
    assert h.result().completions[0].token_ids == samples[by_score].token_ids


def test_through_a_generator_uses_free_slots(engine):
    from maxmodel.data.tokenizer import ByteTokenizer
    from maxmodel.inference.beam import beam_search
    from maxmodel.inference.generator import Generator
    gen = Generator(engine, ByteTokenizer())
    gen.batcher.slots[0] = object()  # an occupied slot: the beams must go elsewhere and leave it alone
    before = np.asarray(engine.state.cache["layers"][0]["k"][:, 0])
    out = beam_search(gen, PROMPT, 2, DEPTH, eos_ids=[EOS])
    assert out == beam_search(engine, PROMPT, 2, DEPTH, slots=[5, 6], eos_ids=[EOS])
    gen.batcher.slots[0] = None
    np.testing.assert_array_equal(np.asarray(engine.state.cache["layers"][0]["k"][:, 0]), before)
