"""Beam search with a length penalty, on the engine's decode slots (Hugging Face semantics).

The request is prefilled once and occupies `num_beams` slots. Each step scores every (beam, token) pair by
the beam's summed RAW log-probability (log_softmax of the unmodified logits) plus the token's, takes the
best 2 * num_beams candidates over beams x vocab, and walks them best first: a candidate ending in an EOS
id becomes a finished hypothesis (only if it ranks among the first num_beams, as HF), any other one
continues as a beam until num_beams are running. A hypothesis scores sum logprob / len ** length_penalty,
len = its generated tokens including the EOS (transformers' `generated_len`); the pool keeps the
num_beams best. Running beams still there after max_new_tokens join the pool at the end.

Stopping (`early_stopping`): True stops once num_beams hypotheses are finished (HF True); the default
"never" stops only when no running beam can still beat the worst of num_beams finished ones: log-probs
are <= 0, so a beam's best reachable score is its sum divided by the longest length it could reach
(length_penalty > 0) or the next one (<= 0). That bound is exact, so the result is what running to
max_new_tokens gives (HF's early_stopping="never").

The slots' caches are reordered between steps by one compiled gather over the batch axis of the decode
state's cache with a permutation [max_slots] (identity on slots that are not the beams'), so other
requests' slots are untouched; the chosen tokens are then written by one decode step of the beams' slots.
"""
from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import numpy as np

from .engine import DecodeState, Engine, _batch_axis, constrain_cache
from .sampling import SamplingOptions, stack_params

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> {k: jitted step}


def _step_fn(engine: Engine, k: int):
    """(params, state, perm, tokens, active) -> (state, top-k logprobs [B, k], their ids [B, k])."""
    def step(params, state: DecodeState, perm, tokens, active):
        engine.traces["beam_step", k] += 1
        cache = {g: [{n: jnp.take(x, perm, axis=_batch_axis(g)) for n, x in c.items()} for c in caches]
                 for g, caches in state.cache.items()}
        lengths = state.lengths[perm]
        model = engine._model(params)
        h, cache = model.decode(tokens[:, None], jnp.where(active, lengths, -1)[:, None], lengths, cache)
        logp = jax.nn.log_softmax(model.logits(h)[:, 0].astype(jnp.float32), axis=-1)
        top_lp, top_ids = jax.lax.top_k(logp, k)
        tokens = jnp.where(active, tokens, state.tokens)
        state = state._replace(cache=constrain_cache(cache), lengths=lengths + active.astype(jnp.int32),
                               tokens=tokens)
        return state, top_lp, top_ids
    fns = _COMPILED.setdefault(engine, {})
    if k not in fns:
        fns[k] = jax.jit(step, donate_argnums=1)
    return fns[k]


def _best_reachable(total: float, cur_len: int, max_len: int, length_penalty: float) -> float:
    """Upper bound on the score of any continuation of a beam with `cur_len` tokens summing to `total`."""
    reach = max_len if length_penalty > 0 else min(cur_len + 1, max_len)
    return total / reach ** length_penalty


def beam_search(generator_or_engine, prompt_ids, num_beams: int, max_new_tokens: int,
                length_penalty: float = 1.0, eos_ids=None, early_stopping: bool | str = "never",
                slots: list[int] | None = None) -> list[tuple[list[int], float]]:
    """The num_beams best hypotheses as (token_ids, score), best first. `generator_or_engine`: a Generator
    (its batcher is paused meanwhile and free slots are used; eos_ids default to the model's) or an Engine
    (slots 0..num_beams-1 unless `slots` says otherwise; no EOS unless given)."""
    batcher = getattr(generator_or_engine, "batcher", None)
    engine: Engine = batcher.engine if batcher is not None else generator_or_engine
    eos = set(eos_ids if eos_ids is not None else (batcher.eos_ids if batcher is not None else ()))
    prompt_ids = [int(t) for t in prompt_ids]
    if not 1 <= num_beams <= engine.max_slots:
        raise ValueError(f"num_beams: must be in [1, {engine.max_slots}] (the engine's slots), got {num_beams}")
    if max_new_tokens < 1 or len(prompt_ids) + max_new_tokens > engine.max_len:
        raise ValueError(f"max_new_tokens: {len(prompt_ids)} + {max_new_tokens} tokens do not fit the engine's "
                         f"max_len {engine.max_len}")
    if batcher is None:
        return _search(engine, engine.prefill, slots or list(range(num_beams)), prompt_ids, num_beams,
                       max_new_tokens, length_penalty, eos, early_stopping)
    with batcher._run:  # no batch iteration meanwhile: the beams own free slots for the whole search
        free = [i for i, s in enumerate(batcher.slots) if s is None]
        if len(free) < num_beams:
            raise RuntimeError(f"num_beams: {num_beams} slots needed, {len(free)} free")
        return _search(engine, batcher.prefill, free[:num_beams], prompt_ids, num_beams, max_new_tokens,
                       length_penalty, eos, early_stopping)


def _search(engine, prefill, slots, prompt, num_beams, max_new, alpha, eos, early_stopping):
    k = min(2 * num_beams, engine.vocab_size)
    row, logits, _ = prefill(prompt)
    greedy = stack_params([SamplingOptions(temperature=0.0)], 1)
    engine.insert(row, logits, slots[0], prompt, greedy)  # the prompt's cache in the first beam's slot
    logp0 = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))[0]
    order = np.argsort(-logp0, kind="stable")[:k]
    cand_lp, cand_ids = logp0[order][None], order[None]       # [beams, k] candidate logprobs and tokens
    beams = [([], 0.0, slots[0])]                             # (tokens, sum logprob, slot holding its cache)
    finished: list[tuple[float, list[int]]] = []              # (score, tokens), best first, <= num_beams

    def add(tokens, total):
        finished.append((total / len(tokens) ** alpha, tokens))
        finished.sort(key=lambda f: -f[0])
        del finished[num_beams:]

    for t in range(max_new):
        totals = np.array([b[1] for b in beams])[:, None] + cand_lp           # [beams, k]
        flat = np.argsort(-totals, axis=None, kind="stable")[:2 * num_beams]
        running = []
        for rank, f in enumerate(flat):
            i, j = divmod(int(f), totals.shape[1])
            tokens = beams[i][0] + [int(cand_ids[i, j])]
            if tokens[-1] in eos:
                if rank < num_beams:
                    add(tokens, float(totals[i, j]))
            else:
                running.append((tokens, float(totals[i, j]), i))
            if len(running) == num_beams:
                break
        if not running or t == max_new - 1:
            beams = [(tok, total, None) for tok, total, _ in running]
            break
        if len(finished) == num_beams and (early_stopping is True or finished[-1][0] >= _best_reachable(
                running[0][1], t + 1, max_new, alpha)):
            beams = []  # nothing running can enter the pool any more (or HF's early_stopping=True)
            break
        # Beam j moves to slots[j] with its parent's cache; one decode step writes its new token.
        perm = np.arange(engine.max_slots)
        tokens = np.asarray(engine.state.tokens).copy()
        active = np.zeros(engine.max_slots, bool)
        for j, (tok, _, parent) in enumerate(running):
            perm[slots[j]] = beams[parent][2]
            tokens[slots[j]] = tok[-1]
            active[slots[j]] = True
        with engine.context():
            engine.state, top_lp, top_ids = _step_fn(engine, k)(
                engine.run_params, engine.state, jnp.asarray(perm), jnp.asarray(tokens, jnp.int32), jnp.asarray(active))
        top_lp, top_ids = np.asarray(top_lp), np.asarray(top_ids)
        beams = [(tok, total, slots[j]) for j, (tok, total, _) in enumerate(running)]
        cand_lp, cand_ids = top_lp[slots[:len(beams)]], top_ids[slots[:len(beams)]]
    for tok, total, _ in beams:
        add(tok, total)
    return [(tok, score) for score, tok in finished]
