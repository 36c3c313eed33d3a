"""Sampling: filter properties over random logits and parameters, distributions (chi-square), seeds,
penalties against a numpy reference, raw logprobs, and the host-side options.

One batch shape (B x V) and one num_top throughout, so `sample` compiles once for the whole file."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from maxmodel.inference.sampling import (
    SamplingOptions,
    SamplingParams,
    apply_penalties,
    count_tokens,
    processed_logprobs,
    prompt_token_mask,
    sample,
    seed_to_u32,
    stack_params,
    token_logprobs,
)

B, V, TOP = 512, 32, 5
OFF = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
       "presence_penalty": 0.0, "frequency_penalty": 0.0, "seed": 0}
DTYPES = {"top_k": np.int32, "seed": np.uint32}


def params(**cols) -> SamplingParams:
    """[B] arrays: each column a scalar (broadcast) or an array; unnamed columns off, temperature 1."""
    cols = {**OFF, **cols}
    return SamplingParams(**{f: jnp.asarray(np.broadcast_to(cols[f], (B,)).astype(DTYPES.get(f, np.float32)))
                             for f in SamplingParams._fields})


def draw(logits, p, step=0, counts=None, pmask=None):
    counts = np.zeros((B, V), np.int32) if counts is None else counts
    pmask = np.zeros((B, V), bool) if pmask is None else pmask
    step = np.broadcast_to(step, (B,)).astype(np.int32)
    out = sample(jnp.asarray(logits, jnp.float32), p, jnp.asarray(step), jnp.asarray(counts),
                 jnp.asarray(pmask), num_top=TOP)
    return jax.tree.map(np.asarray, out)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def allowed(x, top_k, top_p, min_p, tol=1e-5):
    """numpy reference of the kept set for one row of temperature-scaled logits `x` (float64):
    top-k by value, then the smallest prefix reaching mass top_p of the top-k-renormalised distribution,
    then prob >= min_p * max prob. Tolerances only ever widen the set at float-rounding boundaries."""
    keep = np.ones(V, bool)
    if 0 < top_k < V:
        keep &= x >= np.sort(x)[::-1][top_k - 1]
    probs = np.where(keep, softmax(np.where(keep, x, -np.inf)), 0.0)
    if top_p < 1:
        mass_above = np.array([probs[probs > probs[t]].sum() for t in range(V)])
        keep &= mass_above < top_p + tol
    return keep & (probs >= min_p * probs.max() - tol)


def random_filters(rng, which):
    k = rng.integers(1, 8, B) if which in ("top_k", "all") else np.zeros(B, int)
    if which == "all":  # some rows off, some above V (off too)
        k = np.where(rng.random(B) < 0.2, 0, np.where(rng.random(B) < 0.1, V + 3, k))
    p = rng.uniform(0.05, 0.95, B) if which in ("top_p", "all") else np.ones(B)
    m = rng.uniform(0.05, 0.6, B) if which in ("min_p", "all") else np.zeros(B)
    return k, p, m


@pytest.mark.parametrize("which", ["top_k", "top_p", "min_p", "all"])
def test_samples_always_in_the_allowed_set(which):
    rng = np.random.default_rng(["top_k", "top_p", "min_p", "all"].index(which))
    for call in range(3):
        logits = rng.normal(0, 2, (B, V))
        temp = rng.uniform(0.3, 2.0, B)
        k, p, m = random_filters(rng, which)
        seeds = rng.integers(0, 2**32, B)
        out = draw(logits, params(temperature=temp, top_k=k, top_p=p, min_p=m, seed=seeds), step=call)
        for r in range(B):
            keep = allowed(logits[r] / temp[r], k[r], p[r], m[r])
            assert keep[out.tokens[r]], (which, r, k[r], p[r], m[r])


def chi2_pvalue(tokens, probs):
    """Chi-square goodness of fit; bins with expected count < 5 are pooled (the test's validity condition)."""
    counts = np.bincount(tokens, minlength=V).astype(float)
    expected = probs * len(tokens)
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    return scipy.stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def draws(logits_row, calls=40, **cols):
    """calls * B draws from one row of logits: every row its own seed, every call its own step."""
    out = []
    for call in range(calls):
        seeds = np.arange(B) + B * call
        out.append(draw(np.broadcast_to(logits_row, (B, V)), params(seed=seeds, **cols), step=call).tokens)
    return np.concatenate(out)


def test_distribution_matches_softmax_and_tempered_softmax():
    logits = np.random.default_rng(7).normal(0, 1, V)
    plain = draws(logits)
    assert chi2_pvalue(plain, softmax(logits)) > 1e-3
    for t in (0.5, 2.0):
        tempered = draws(logits, temperature=t)
        assert chi2_pvalue(tempered, softmax(logits / t)) > 1e-3
        # the test has power: the tempered draws are told apart from the untempered distribution
        assert chi2_pvalue(tempered, softmax(logits)) < 1e-3


def test_filtered_distribution_is_the_renormalised_kept_set():
    logits = np.random.default_rng(8).normal(0, 1, V)
    k, p, t = 10, 0.7, 0.8
    keep = allowed(logits / t, k, p, 0.0, tol=0)
    probs = np.where(keep, softmax(logits / t), 0)
    tokens = draws(logits, calls=20, temperature=t, top_k=k, top_p=p)
    assert keep[tokens].all()
    assert chi2_pvalue(tokens, probs / probs.sum()) > 1e-3


def test_top_k_one_and_tiny_temperature_equal_greedy():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (B, V))
    greedy = draw(logits, params(temperature=0.0)).tokens
    assert (greedy == logits.argmax(-1)).all()
    seeds = rng.integers(0, 2**32, B)
    top1 = draw(logits, params(temperature=rng.uniform(0.5, 2, B), top_k=1, seed=seeds)).tokens
    assert (top1 == greedy).all()
    assert (draw(logits, params(temperature=1e-6, seed=seeds)).tokens == greedy).all()  # below GREEDY_BELOW
    assert (draw(logits, params(temperature=1e-4, seed=seeds)).tokens == greedy).all()  # drawn, still argmax
    hot = draw(logits, params(temperature=1.0, seed=seeds)).tokens
    assert (hot != greedy).mean() > 0.2  # which a temperature of 1 is not


def test_same_seed_and_step_same_token_wherever_the_row_and_whatever_shares_the_batch():
    rng = np.random.default_rng(2)
    n = 64
    own_logits = rng.normal(0, 1, (n, V))
    own = {"temperature": rng.uniform(0.5, 1.5, n), "top_k": np.where(np.arange(n) % 2, 0, 6),
               "top_p": np.where(np.arange(n) % 3, 1.0, 0.8), "min_p": np.where(np.arange(n) % 5, 0.0, 0.1),
               "repetition_penalty": np.ones(n), "seed": rng.integers(0, 2**32, n)}
    own["top_k"][: n // 2], own["top_p"][: n // 2] = 0, 1.0  # plain rows: a no-sort batch below
    steps = rng.integers(0, 100, n)

    def batch(positions, fill_rng, plain_only):
        logits = fill_rng.normal(0, 3, (B, V))
        cols = {"temperature": fill_rng.uniform(0, 2, B), "top_k": fill_rng.integers(0, 5, B),
                    "top_p": fill_rng.uniform(0.3, 1, B), "min_p": fill_rng.uniform(0, 0.2, B),
                    "repetition_penalty": fill_rng.uniform(1, 1.5, B), "seed": fill_rng.integers(0, 2**32, B)}
        if plain_only:  # nothing in this batch needs the sort
            cols.update(top_k=np.zeros(B, int), top_p=np.ones(B), min_p=np.zeros(B))
        step = fill_rng.integers(0, 100, B)
        logits[positions], step[positions] = own_logits[: len(positions)], steps[: len(positions)]
        for f, v in own.items():
            cols[f][positions] = v[: len(positions)]
        return draw(logits, params(**cols), step=step).tokens[positions]

    # plain rows alone (no-sort branch) vs moved and mixed with filtered rows of other requests (sort branch)
    alone = batch(np.arange(n // 2), np.random.default_rng(3), plain_only=True)
    mixed = batch(rng.permutation(B)[: n // 2], np.random.default_rng(4), plain_only=False)
    assert (alone == mixed).all()
    # every kind of row, at two different sets of positions, among two different crowds
    a = batch(rng.permutation(B)[:n], np.random.default_rng(5), plain_only=False)
    b = batch(rng.permutation(B)[:n], np.random.default_rng(6), plain_only=False)
    assert (a == b).all()


def test_different_seeds_or_steps_differ_same_ones_repeat():
    flat = np.zeros((B, V))
    by_seed = draw(flat, params(seed=np.arange(B))).tokens
    assert len(np.unique(by_seed)) >= V - 2  # 512 uniform draws over 32 tokens cover nearly all of them
    by_step = draw(flat, params(seed=7), step=np.arange(B)).tokens
    assert len(np.unique(by_step)) >= V - 2
    repeated = draw(flat, params(seed=7), step=3).tokens
    assert (repeated == repeated[0]).all() and (repeated == by_step[3]).all()


def reference_penalties(logits, counts, pmask, rep, pres, freq):
    seen = pmask | (counts > 0)
    out = np.where(seen, np.where(logits > 0, logits / rep[:, None], logits * rep[:, None]), logits)
    return out - freq[:, None] * counts - pres[:, None] * (counts > 0)


def test_penalties_match_the_numpy_reference():
    rng = np.random.default_rng(9)
    logits = rng.normal(0, 2, (B, V))
    counts = rng.integers(0, 4, (B, V)) * (rng.random((B, V)) < 0.2)
    pmask = rng.random((B, V)) < 0.2  # some prompt-only, some output-only, some both
    rep, pres, freq = rng.uniform(0.5, 2, B), rng.uniform(-2, 2, B), rng.uniform(-2, 2, B)
    p = params(temperature=0.0, repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq)
    want = reference_penalties(logits, counts, pmask, rep, pres, freq)
    got = apply_penalties(jnp.asarray(logits, jnp.float32), p, jnp.asarray(counts, jnp.int32),
                          jnp.asarray(pmask))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert (want.argmax(-1) != logits.argmax(-1)).mean() > 0.3  # the penalties matter for greedy here
    assert (draw(logits, p, counts=counts, pmask=pmask).tokens == want.argmax(-1)).all()
    # the sampled distribution (temperature 1, no filters) is the softmax of the penalised logits
    lp = processed_logprobs(jnp.asarray(logits, jnp.float32), p._replace(temperature=jnp.ones(B)),
                            jnp.asarray(counts, jnp.int32), jnp.asarray(pmask))
    np.testing.assert_allclose(np.asarray(lp), np.log(softmax(want)), rtol=1e-4, atol=1e-4)


def test_processed_logprobs_of_greedy_and_filtered_rows():
    rng = np.random.default_rng(10)
    logits = rng.normal(0, 2, (B, V))
    temp = np.where(np.arange(B) % 2, 0.7, 0.0)
    lp = np.asarray(processed_logprobs(jnp.asarray(logits, jnp.float32), params(temperature=temp, top_k=4),
                                       jnp.zeros((B, V), jnp.int32), jnp.zeros((B, V), bool)))
    greedy, sampled = lp[::2], lp[1::2]
    assert (greedy.argmax(-1) == logits[::2].argmax(-1)).all() and (np.isfinite(greedy).sum(-1) == 1).all()
    assert (np.isfinite(sampled).sum(-1) == 4).all()
    np.testing.assert_allclose(np.exp(sampled).sum(-1), 1, rtol=1e-5)


def test_logprobs_are_the_raw_model_distribution():
    rng = np.random.default_rng(11)
    logits = rng.normal(0, 2, (B, V))
    counts = rng.integers(0, 3, (B, V))
    p = params(temperature=rng.uniform(0, 2, B), top_k=3, top_p=0.8, repetition_penalty=1.5,
               frequency_penalty=0.5, seed=np.arange(B))
    out = draw(logits, p, counts=counts)
    raw = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)))
    np.testing.assert_allclose(out.logprobs, raw[np.arange(B), out.tokens], rtol=1e-6)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-logits, axis=-1)[:, :TOP])
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(raw, out.top_ids, -1), rtol=1e-6)


def test_token_logprobs_for_prompts():
    rng = np.random.default_rng(12)
    logits = rng.normal(0, 2, (3, 7, V))
    tokens = rng.integers(0, V, (3, 7))
    lp, ids, top = map(np.asarray, token_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens), 2))
    want = np.log(softmax(logits))
    np.testing.assert_allclose(lp, np.take_along_axis(want, tokens[..., None], -1)[..., 0], rtol=1e-5)
    np.testing.assert_array_equal(ids, np.argsort(-logits, -1)[..., :2])
    np.testing.assert_allclose(top, np.take_along_axis(want, ids, -1), rtol=1e-5)


def test_count_tokens_and_prompt_mask():
    counts = count_tokens(jnp.zeros((3, 5), jnp.int32), jnp.array([1, 4, 1]), jnp.array([True, True, False]))
    counts = count_tokens(counts, jnp.array([1, 4, 2]), jnp.array([True, False, True]))
    np.testing.assert_array_equal(counts, [[0, 2, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 1, 0, 0]])
    mask = prompt_token_mask(jnp.array([[1, 2, 2], [3, 0, 0]]), jnp.array([[1, 1, 1], [1, 0, 0]], bool), 5)
    np.testing.assert_array_equal(mask, [[0, 1, 1, 0, 0], [0, 0, 0, 1, 0]])


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("temperature", -0.1), ("temperature", float("nan")),
    ("temperature", "hot"), ("top_k", -1), ("top_k", True), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1),
    ("min_p", 1.1), ("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("frequency_penalty", -3),
    ("seed", 1.5), ("stop", [""]), ("stop", [3]), ("stop_token_ids", [-1]), ("stop_token_ids", [1000]),
    ("ignore_eos", "yes"), ("echo", 1), ("logprobs", 21), ("logprobs", -1), ("n", 0), ("n", 129),
    ("best_of", 1)])
def test_validate_names_the_field(field, value):
    base = {"n": 2} if field == "best_of" else {}
    opt = SamplingOptions(**{**base, field: value})
    with pytest.raises(ValueError, match=f"^{field}: "):
        opt.validate(vocab_size=512)


def test_valid_options_and_seeds():
    SamplingOptions(temperature=0, top_k=50, top_p=0.9, min_p=0.05, seed=-5, stop="\n\n", stop_token_ids=[2],
                    logprobs=0, n=4, best_of=8).validate(vocab_size=512)
    assert SamplingOptions(stop="x").stop == ["x"]
    a, b = SamplingOptions(), SamplingOptions()
    assert isinstance(a.seed, int) and a.seed != b.seed  # drawn on the host (2**-32 chance of failing)
    opt = SamplingOptions(seed=2**40 + 3, n=3)
    seeds = [opt.sample_seed(i) for i in range(3)]
    assert seeds[0] == seed_to_u32(opt.seed) and len(set(seeds)) == 3 and all(0 <= s < 2**32 for s in seeds)
    assert SamplingOptions(n=2, best_of=5).num_samples == 5 and SamplingOptions(n=2).num_samples == 2


def test_stack_params_pads_with_greedy_rows():
    opts = [SamplingOptions(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, repetition_penalty=1.2,
                            presence_penalty=0.5, frequency_penalty=-0.5, seed=3),
            SamplingOptions(seed=2**33 + 1)]
    p = stack_params(opts, pad_to=4)
    np.testing.assert_allclose(p.temperature, [0.7, 1.0, 0, 0])
    np.testing.assert_array_equal(p.top_k, [5, 0, 0, 0])
    np.testing.assert_allclose(p.top_p, [0.9, 1, 1, 1])
    np.testing.assert_allclose(p.repetition_penalty, [1.2, 1, 1, 1])
    np.testing.assert_allclose(p.frequency_penalty, [-0.5, 0, 0, 0])
    np.testing.assert_array_equal(p.seed, [3, seed_to_u32(2**33 + 1), 0, 0])
    assert p.seed.dtype == jnp.uint32 and p.top_k.dtype == jnp.int32 and p.min_p.dtype == jnp.float32
    np.testing.assert_array_equal(stack_params(opts, 2, seeds=[9, 10]).seed, [9, 10])
    with pytest.raises(ValueError):
        stack_params(opts, pad_to=1)
