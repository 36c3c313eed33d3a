"""Speculative decoding against independent oracles: the target's plain greedy decoding, and the target's
exact output distribution computed from its own forward pass.

One tiny target (vocab 16, 1 layer; init_std 0.5 so that its distributions are peaked and a random draft
disagrees with it often) and one draft of the same shape with other random weights ("poor draft"); the
self-draft cases load the target's weights into the draft engine (set_params: nothing recompiles). Every
speculative batcher uses k=2, so the whole file compiles one draft round and one n-gram round.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib

import numpy as np
import pytest
from scipy import stats
from tiny_engine import build_engine

from maxmodel.data.tokenizer import ByteTokenizer
from maxmodel.inference.batcher import Batcher
from maxmodel.inference.engine import Engine
from maxmodel.inference.load import prune_vocabulary
from maxmodel.inference.sampling import SamplingOptions
from maxmodel.inference.speculative import SpeculativeConfig, ngram_propose

V, K, SLOTS = 16, 2, 64
PROMPT = [3, 5, 7, 3, 5, 9, 3, 5, 7, 3]   # repeats, so the n-gram drafter has something to propose


def _engine(seed):
    return build_engine(["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
                         "model.d_ff=64", f"model.vocab_size={V}", "model.init_std=0.5", "mesh.data=1",
                         "run.cpu_devices=1", f"train.seed={seed}"],
                        max_slots=SLOTS, max_len=40, prefill_buckets=(16,), spare=K + 1)


def _pruned(engine, n):
    """The engine's model over its first n token ids (load.prune_vocabulary), on the same mesh."""
    cfg, params = prune_vocabulary(engine.cfg, engine.params, n)
    return Engine(cfg, engine._graphdef_given, params, engine.mesh, engine.rules, engine.options)


@pytest.fixture(scope="module")
def rig():
    target, draft = _engine(0), _engine(1)
    tok = ByteTokenizer()
    return dict(target=target, draft=draft, poor=draft.params, plain=Batcher(target, tok),
                spec=Batcher(target, tok, speculative=SpeculativeConfig(draft, k=K)),
                # a draft proposing over 12 of the 16 ids: q = 0 on the others, which only residuals can give
                pruned=Batcher(target, tok, speculative=SpeculativeConfig(_pruned(draft, V - 4), k=K)),
                ngram=Batcher(target, tok, speculative=SpeculativeConfig(None, k=K, ngram=3)))


@contextlib.contextmanager
def self_draft(rig):
    rig["draft"].set_params(rig["target"].params)
    try:
        yield
    finally:
        rig["draft"].set_params(rig["poor"])


def _reset(batcher):
    batcher.counters.clear()
    if batcher.spec is not None:
        batcher.spec.counters.clear()


def _greedy(batcher, prompts, **kw):
    opts = SamplingOptions(temperature=0.0, ignore_eos=True, **{"max_new_tokens": 12, **kw})
    return [o.completions[0] for o in batcher.generate(prompts, opts)]


PROMPTS = [list(map(int, np.random.default_rng(i).integers(0, V, n))) for i, n in enumerate((3, 7, 12, 16, 5))]


def test_greedy_matches_plain_greedy(rig):
    """Poor draft (many rejections), self-draft (acceptance exactly 1) and n-gram: the same tokens as the
    target's plain greedy decoding, with rows of different prompt lengths and acceptance counts."""
    ref = [c.token_ids for c in _greedy(rig["plain"], PROMPTS)]
    for name in ("spec", "pruned", "ngram"):
        b = rig[name]
        _reset(b)
        assert [c.token_ids for c in _greedy(b, PROMPTS)] == ref, name
        st = b.stats()
        assert 0 <= st["spec_accepted"] <= st["spec_proposed"]
        # every active row-round emits 1 + (accepted in that row) tokens, minus what a finish cut off
        after_first = st["generated_tokens"] - len(PROMPTS)
        assert st["occupied_slot_steps"] <= after_first <= st["occupied_slot_steps"] + st["spec_accepted"]
        if name in ("spec", "pruned"):
            assert st["spec_proposed"] == K * st["occupied_slot_steps"]
            assert st["spec_acceptance_rate"] < 0.9, "the random draft should disagree often"
    b = rig["spec"]
    with self_draft(rig):
        _reset(b)
        assert [c.token_ids for c in _greedy(b, PROMPTS)] == ref
        st = b.stats()
    assert st["spec_acceptance_rate"] == 1.0 and st["spec_accepted"] == st["spec_proposed"] > 0
    assert st["steps"] < st["generated_tokens"] / 2  # k+1 = 3 tokens per round


def test_stop_inside_an_accepted_run(rig):
    """Self-draft emits runs of 3 tokens; a stop token at the first token of a run, and max_new_tokens
    ending inside one, end the sequence exactly where plain decoding does; the slots are reused afterwards
    and still decode correctly (lengths consistent)."""
    ref = _greedy(rig["plain"], PROMPTS)
    # token 0 comes from the insert, then runs cover indices 1-3, 4-6, ...: pick a first occurrence at 1+3r
    cases = [(p, r.token_ids[j]) for p, r in zip(PROMPTS, ref) for j in (4, 7, 1)
             if r.token_ids.index(r.token_ids[j]) == j]
    assert cases, "no usable stop token in these greedy outputs"
    prompt, stop = cases[0]
    with self_draft(rig):
        for kw in (dict(stop_token_ids=[stop]), dict(max_new_tokens=5)):
            want = _greedy(rig["plain"], [prompt], **kw)[0]
            got = _greedy(rig["spec"], [prompt], **kw)[0]
            assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason), kw
        assert [c.token_ids for c in _greedy(rig["spec"], PROMPTS)] == [c.token_ids for c in ref]


def test_ngram_propose():
    assert ngram_propose([1, 2, 3, 9, 1, 2, 3, 4, 1, 2], 3, 2) == [3, 4]  # most recent match of [1, 2]
    assert ngram_propose([5, 6, 7, 8, 6], 3, 4) == [7, 8, 6]             # fallback to n=1, fewer than k
    assert ngram_propose([1, 2, 3], 2, 2) == []
    assert ngram_propose([4] * 8, 3, 4) == [4] * 4                       # a run: not the overlapping match
    assert ngram_propose([1, 2, 9, 9, 1, 2, 7, 1, 2], 2, 4) == [9, 9, 1, 2]  # only the older match has 4 after


# ---------------------------------------------------------------- distribution

def _exact_joint(engine, top_k=0):
    """P(t1, t2, t3, t4 | PROMPT) [V]*4 from the engine's plain forward pass over all V^3 continuations."""
    cont = np.stack(np.meshgrid(*[np.arange(V)] * 3, indexing="ij"), -1).reshape(-1, 3)
    seqs = np.concatenate([np.tile(PROMPT, (len(cont), 1)), cont], axis=1)
    logits = np.asarray(engine.logits_of(seqs), np.float64)[:, len(PROMPT) - 1:]       # [V^3, 4, V]
    if top_k:
        kth = np.sort(logits, axis=-1)[..., -top_k][..., None]
        logits = np.where(logits >= kth, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p = p.reshape(V, V, V, 4, V)
    return (p[0, 0, 0, 0][:, None, None, None] * p[:, 0, 0, 1][:, :, None, None]
            * p[:, :, 0, 2][:, :, :, None] * p[:, :, :, 3])


def _chi2_p(observed, expected_probs):
    """Pearson chi-square p-value; cells expected < 5 pooled into one."""
    obs, exp = observed.ravel().astype(float), expected_probs.ravel() * observed.sum()
    assert obs[exp == 0].sum() == 0, "a draw the target gives probability 0"
    small = exp < 5
    obs = np.append(obs[~small], obs[small].sum())
    exp = np.append(exp[~small], exp[small].sum())
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep]).pvalue


def _draws(batcher, top_k, requests=32):
    outs = batcher.generate([PROMPT] * requests, [
        SamplingOptions(max_new_tokens=4, temperature=1.0, top_k=top_k, ignore_eos=True, n=SLOTS, seed=1000 + r)
        for r in range(requests)])
    return np.array([c.token_ids for o in outs for c in o.completions])               # [2048, 4]


def _margins(x, joint):
    """(observed, expected) for t2, t3 and t4 (first and second speculated token, bonus) and (t1, t2)."""
    count = lambda cols: np.histogramdd(x[:, cols], bins=[np.arange(V + 1)] * len(cols))[0]
    return [(count([1]), joint.sum((0, 2, 3))), (count([2]), joint.sum((0, 1, 3))),
            (count([3]), joint.sum((0, 1, 2))), (count([0, 1]), joint.sum((2, 3)))]


@pytest.mark.parametrize("drafter,top_k", [("spec", 0), ("spec", 4), ("pruned", 0), ("ngram", 0)])
def test_sampled_distribution_is_the_targets(rig, drafter, top_k):
    """2048 draws of the first 4 tokens after PROMPT (t1 from the insert, then t2, t3 = the two speculated
    tokens or their residual resamples, t4 = the bonus token when both were accepted) with a POOR draft
    (random other weights; also pruned to 12 of the 16 ids) or the n-gram drafter, temperature 1 with and without top-k=4. Pearson
    chi-square of the counts of t2, t3, t4 and of the pair (t1, t2) against the target's exact
    distribution from its own forward pass (cells expected < 5 pooled): every p-value > 1e-3."""
    b = rig[drafter]
    _reset(b)
    x = _draws(b, top_k)
    joint = _exact_joint(rig["target"], top_k)
    pvalues = [_chi2_p(obs, exp) for obs, exp in _margins(x, joint)]
    st = b.stats()
    assert 0 < st["spec_accepted"] < st["spec_proposed"], st  # both branches (accept, resample) were taken
    assert min(pvalues) > 1e-3, pvalues
    if drafter == "spec" and top_k == 0:
        # the test has power: the same draws are told apart from the draft's own next-token distribution
        q = _exact_joint(rig["draft"])
        mixed = joint.sum((1, 2, 3))[:, None] * (q.sum((2, 3)) / q.sum((1, 2, 3))[:, None])  # P(t1) Q(t2|t1)
        assert _chi2_p(_margins(x, joint)[3][0], mixed) < 1e-3


def test_same_seed_same_output(rig):
    opts = lambda: SamplingOptions(max_new_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    a = rig["spec"].generate([PROMPT, PROMPTS[1]], opts())
    b = rig["spec"].generate([PROMPTS[2], PROMPT], opts())  # other slot, other neighbours
    assert a[0].completions[0].token_ids == b[1].completions[0].token_ids


def test_pruned_vocabulary_bounds(rig):
    from maxmodel.config import ConfigError
    with pytest.raises(ConfigError, match="--draft-vocab"):
        prune_vocabulary(rig["draft"].cfg, rig["draft"].params, V + 1)
    wider = _pruned(rig["target"], V)  # the target's own vocabulary: a no-op, accepted
    assert wider.vocab_size == V
