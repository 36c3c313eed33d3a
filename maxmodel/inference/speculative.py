"""Speculative decoding (Leviathan et al. 2023): a cheap drafter proposes k tokens per slot, the target checks
all of them in ONE forward pass (a chunk of k+1 tokens against its cache), and rejection sampling keeps the
output distribution exactly the target's.

Per row and round, with p_i / q_i the target's / drafter's *processed* distributions at draft position i
(sampling.processed_logprobs: penalties, temperature, top-k / top-p / min-p, the same parameters for both):
accept draft token d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw the token
from normalize(max(0, p_i - q_i)); when all proposals are accepted draw a bonus token from p after them. A
round thus emits 1..k+1 tokens per row (`tokens [B, k+1]` + `count [B]`). Greedy rows have point-mass p and
q, so the rule reduces to "accept while the draft equals the target's argmax, then the target's argmax":
exactly the target's greedy output.

Two drafters:
  * a draft model (any smaller maxmodel model with the same vocabulary), run as an `Engine` whose cache holds
    the same prefix as the target's. Its k steps and the target's verification are one compiled function.
  * n-gram / prompt lookup (host side, no model): propose the up-to-k tokens that followed the most recent
    earlier occurrence of the last n tokens of prompt + output (n = ngram down to 1). q is a point mass on
    the proposal, so the rule becomes: accept with probability p(d); on rejection draw from p with d removed
    (max(0, p - onehot(d)) = p except 0 at d). Rows with m < k proposals accept at most m and then draw
    from p (as the bonus). Rows with none take a plain target step inside the same verification pass.

Both caches are rolled back by lengths only (kv_cache: entries at or past `lengths` are ignored). Invariant
between rounds: the target cache holds prompt + output except the last emitted token (`state.tokens`, the
"pending" token written by the next pass), like a plain step. The draft cache holds the same minus one more
token when the whole run was accepted (the draft never fed its own last proposal d_k): that token is kept on
the host (`extra`) and re-fed next round together with the pending token as a 2-token chunk.

Randomness: every draw of a row uses fold_in(fold_in(key(seed), g), PURPOSE) with g the index of the
generated token it concerns, so a request's output depends only on its seed. A round's emitted tokens
depend only on the keys of the indices it emits; the draws at later, discarded indices influence nothing,
so reusing those indices next round keeps the draws independent.
"""
from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .engine import DecodeState, Engine, constrain_cache
from .sampling import (GREEDY_BELOW, SampleOut, SamplingParams, _sampled, apply_penalties, argmax, processed_logprobs,
                       raw_logprobs)

DRAFT, ACCEPT, FINAL = 1, 2, 3  # purpose constants folded into a row's per-token key


@dataclasses.dataclass
class SpeculativeConfig:
    draft: Engine | None = None   # a draft model's engine (same vocab and slots as the target); None = n-gram
    k: int = 4                    # tokens proposed per round
    ngram: int = 0                # n-gram drafter's longest n (used when draft is None)


def _key(seed, index, purpose: int):
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index), purpose)


def _keys(seed, index, purpose: int):
    """[B] keys: fold_in(fold_in(key(seed), index), purpose)."""
    return jax.vmap(lambda s, t: _key(s, t, purpose))(seed.astype(jnp.uint32), index)


def _position_counts(counts, drafts):
    """[B, k+1, V]: generated-token counts seen at each verified position (position i follows d_1..d_i)."""
    hot = jax.nn.one_hot(drafts, counts.shape[-1], dtype=counts.dtype)                  # [B, k, V]
    prefix = jnp.concatenate([jnp.zeros_like(hot[:, :1]), jnp.cumsum(hot, axis=1)], axis=1)
    return counts[:, None] + prefix


def _per_position(fn, logits, params: SamplingParams, counts, prompt_mask):
    """fn(logits, params, counts, prompt_mask) of the sampler's [rows, V] form on logits [B, T, V] with
    per-position counts [B, T, V] (each row's params and prompt mask repeated over its T positions);
    the result [B, T, ...]."""
    b, t, v = logits.shape
    rep = lambda x: jnp.repeat(x, t, axis=0)
    out = fn(logits.reshape(b * t, v), SamplingParams(*map(rep, params)), counts.reshape(b * t, v),
             rep(prompt_mask))
    return out.reshape(b, t, *out.shape[1:])


def _processed(logits, params: SamplingParams, counts, prompt_mask):
    """processed_logprobs for logits [B, T, V] with per-position counts [B, T, V]."""
    return _per_position(processed_logprobs, logits, params, counts, prompt_mask)


def _masked_positions(start, t: int, active, max_len: int):
    """[B, t] positions start..start+t-1; -1 on inactive rows and past the cache (never written)."""
    pos = start[:, None] + jnp.arange(t)[None]
    return jnp.where(active[:, None] & (pos < max_len), pos, -1)


def verify(model, state: DecodeState, drafts, q_lp, m, active, max_len: int, num_top: int):
    """The target's pass over [pending, d_1..d_k] and the rejection rule. drafts [B, k]; q_lp [B, k, V] the
    drafter's processed log-probs (None: point masses on the drafts); m [B] usable proposals per row.
    Returns (new state, SampleOut with [B, k+1] fields, count [B] tokens emitted, accepted [B])."""
    b, k = drafts.shape
    chunk = jnp.concatenate([state.tokens[:, None], drafts], axis=1)
    h, cache = model.decode(chunk, _masked_positions(state.lengths, k + 1, active, max_len), state.lengths,
                            state.cache)
    logits = model.logits(h).astype(jnp.float32)                                         # [B, k+1, V]
    position_counts = _position_counts(state.counts, drafts)
    vocab = logits.shape[-1]

    def rejection():  # the rule of the module docstring, for batches with sampled rows
        p = jnp.exp(_processed(logits, state.params, position_counts, state.prompt_mask))
        q = jnp.exp(q_lp) if q_lp is not None else jax.nn.one_hot(drafts, vocab, dtype=p.dtype)
        idx = state.steps[:, None] + jnp.arange(k + 1)[None]                             # generated indices
        p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
        q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
        seeds = jnp.broadcast_to(state.params.seed.astype(jnp.uint32)[:, None], (b, k))
        u = jax.vmap(jax.vmap(lambda s, i: jax.random.uniform(_key(s, i, ACCEPT))))(seeds, idx[:, :k])
        ok = (u * q_d < p_d) & (jnp.arange(k)[None] < m[:, None])   # u < p/q without dividing by q
        n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)                   # accepted [B]
        # The last token: from the residual after a rejection, from p itself after the accepted run (bonus).
        p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
        q_n = jnp.take_along_axis(jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1), n[:, None, None],
                                  axis=1)[:, 0]
        resid = jnp.maximum(p_n - q_n, 0.0)
        resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, p_n)  # (only float noise can empty it)
        final_dist = jnp.where((n < m)[:, None], resid, p_n)
        final = jax.vmap(jax.random.categorical)(_keys(state.params.seed, state.steps + n, FINAL),
                                                 jnp.log(final_dist)).astype(jnp.int32)
        return n, final

    def greedy():  # every row greedy: the rule reduces to "accept while the draft is the target's argmax"
        best = _per_position(lambda *rows: argmax(apply_penalties(*rows)), logits, state.params, position_counts,
                             state.prompt_mask)                                          # [B, k+1]
        ok = (drafts == best[:, :k]) & (jnp.arange(k)[None] < m[:, None])
        n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
        return n, jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]
    n, final = jax.lax.cond(jnp.any(_sampled(state.params)), rejection, greedy)
    pos = jnp.arange(k + 1)[None]
    tokens = jnp.where(pos < n[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), final[:, None])
    count = jnp.where(active, n + 1, 0)
    emitted = pos < count[:, None]
    picked, top_ids, top_lp = raw_logprobs(logits.reshape(b * (k + 1), vocab), tokens.reshape(-1), num_top)
    top = (b, k + 1, top_ids.shape[-1])
    out = SampleOut(tokens, picked.reshape(b, k + 1), top_ids.reshape(top), top_lp.reshape(top))
    counts = state.counts + jnp.sum(jax.nn.one_hot(tokens, vocab, dtype=state.counts.dtype)
                                    * emitted[..., None], axis=1)
    state = DecodeState(constrain_cache(cache), state.lengths + count,   # pending + n accepted now cached
                        jnp.where(active, final, state.tokens), state.steps + count, counts, state.prompt_mask,
                        state.params)
    return state, out, count, jnp.where(active, n, 0)


class Speculator:
    """Device side: one compiled round per drafter kind; host side: n-gram proposals and the draft's extra
    token. `Batcher` calls `prefill_insert` when a sequence enters a slot and `round` instead of a step."""

    def __init__(self, engine: Engine, config: SpeculativeConfig):
        self.engine, self.config, self.draft, self.k = engine, config, config.draft, config.k
        if self.k < 1:
            raise ValueError(f"speculative k: must be >= 1, got {self.k}")
        if self.draft is None and config.ngram < 1:
            raise ValueError("speculative: give a draft engine or ngram >= 1")
        for e in (engine, self.draft) if self.draft is not None else (engine,):
            if e.options.spare < self.k + 1 and _has_windows(e):
                raise ValueError(f"speculative k={self.k}: sliding-window caches need EngineOptions.spare >= "
                                 f"{self.k + 1} (rejected tokens must not overwrite keys still in the window)")
        if self.draft is not None:
            if self.draft.vocab_size > engine.vocab_size or self.draft.max_slots != engine.max_slots:
                raise ValueError(f"draft: vocab {self.draft.vocab_size} / slots {self.draft.max_slots} must be at "
                                 f"most / match the target's {engine.vocab_size} / {engine.max_slots}")
        b = engine.max_slots
        self.extra = np.zeros(b, np.int32)     # draft's unfed last proposal d_k (when the run was all accepted)
        self.has_extra = np.zeros(b, bool)
        self.counters = collections.Counter()
        self._draft_round = jax.jit(self._draft_round_fn, static_argnames="num_top", donate_argnums=(2, 3))
        self._ngram_round = jax.jit(self._ngram_round_fn, static_argnames="num_top", donate_argnums=1)

    # ---- compiled rounds

    def _draft_round_fn(self, params, dparams, state: DecodeState, dstate: DecodeState, extra, has_extra, active,
                        num_top: int):
        """k draft steps on the draft cache (the first a 2-token chunk re-feeding `extra` where set), then verify."""
        self.engine.traces["spec_draft_round", self.k, num_top] += 1
        dmodel, k = self.draft._model(dparams), self.k
        dmax = self.draft.max_len
        has_extra = has_extra & active
        dlen = state.lengths - has_extra.astype(jnp.int32)
        pos = jnp.stack([jnp.where(has_extra, state.lengths - 1, -1),
                         jnp.where(active & (state.lengths < dmax), state.lengths, -1)], axis=1)
        # A draft over fewer ids (the target's first `dvocab`, load.prune_vocabulary) reads target tokens past
        # them as its last id, and proposes with q = 0 outside them: the rejection rule stays exact.
        dvocab, vocab = self.draft.vocab_size, self.engine.vocab_size
        as_draft_ids = lambda t: jnp.minimum(t, dvocab - 1)
        h, dcache = dmodel.decode(as_draft_ids(jnp.stack([extra, state.tokens], axis=1)), pos, dlen, dstate.cache)
        counts = state.counts

        def propose(h_last, counts, j):  # q_j and d_j from the draft's hidden state after token j-1
            logits = dmodel.logits(h_last[:, None]).astype(jnp.float32)
            logits = jnp.pad(logits, ((0, 0), (0, 0), (0, vocab - dvocab)), constant_values=-jnp.inf)

            def sampled():
                q = _processed(logits, state.params, counts[:, None], state.prompt_mask)[:, 0]
                d = jax.vmap(jax.random.categorical)(_keys(state.params.seed, state.steps + j, DRAFT), q)
                greedy = state.params.temperature < GREEDY_BELOW  # categorical over a point mass is its argmax
                return q, jnp.where(greedy, argmax(q), d).astype(jnp.int32)  # anyway, but say it plainly

            def greedy():  # verify's greedy rule reads no q: its point masses stay unbuilt
                d = argmax(apply_penalties(logits[:, 0], state.params, counts, state.prompt_mask))
                return jnp.zeros(logits[:, 0].shape, jnp.float32), d
            q, d = jax.lax.cond(jnp.any(_sampled(state.params)), sampled, greedy)
            return q, d, counts + jax.nn.one_hot(d, counts.shape[-1], dtype=counts.dtype)

        q0, d0, counts = propose(h[:, 1], counts, 0)

        def body(carry, j):
            cache, d_prev, counts = carry
            p = _masked_positions(state.lengths + j, 1, active, dmax)
            h, cache = dmodel.decode(as_draft_ids(d_prev)[:, None], p, state.lengths + j, cache)
            q, d, counts = propose(h[:, 0], counts, j)
            return (cache, d, counts), (q, d)
        (dcache, _, _), (qs, ds) = jax.lax.scan(body, (dcache, d0, counts), jnp.arange(1, k))
        drafts = jnp.concatenate([d0[:, None], ds.T], axis=1)                               # [B, k]
        q_lp = jnp.concatenate([q0[:, None], qs.transpose(1, 0, 2)], axis=1)               # [B, k, V]
        m = jnp.full(state.lengths.shape, k, jnp.int32)
        state, out, count, accepted = verify(self.engine._model(params), state, drafts, q_lp, m, active,
                                             self.engine.max_len, num_top)
        # The draft cache's length: the target's minus the unfed d_k (next round derives it the same way).
        unfed = (active & (count == k + 1)).astype(jnp.int32)
        dstate = dstate._replace(cache=constrain_cache(dcache), lengths=state.lengths - unfed)
        return state, dstate, out, count, accepted

    def _ngram_round_fn(self, params, state: DecodeState, drafts, m, active, num_top: int):
        self.engine.traces["spec_ngram_round", self.k, num_top] += 1
        state, out, count, accepted = verify(self.engine._model(params), state, drafts, None, m, active,
                                             self.engine.max_len, num_top)
        return state, out, count, accepted

    # ---- host API

    def prefill_insert(self, prompt_ids, slots, sp: SamplingParams) -> None:
        """The draft's copy of a new sequence: one draft prefill, inserted into each slot. Only its cache and
        length are used (rounds read the target's pending token, counts and sampling parameters), so the
        token the draft samples there is ignored."""
        self.has_extra[list(slots)] = False
        if self.draft is None:
            return
        row, logits, _ = self.draft.prefill(prompt_ids)
        for slot in slots:
            self.draft.insert(row, logits, slot, prompt_ids, sp, 0)

    def round(self, active: np.ndarray, histories: dict[int, list[int]], num_top: int = 0):
        """One speculative round for the active slots; `histories` (slot -> prompt + output ids, n-gram only).
        Returns (SampleOut numpy with [B, k+1] fields, count [B] numpy)."""
        eng = self.engine
        with eng.context():
            if self.draft is not None:
                eng.state, self.draft.state, out, count, accepted = self._draft_round(
                    eng.run_params, self.draft.run_params, eng.state, self.draft.state, jnp.asarray(self.extra),
                    jnp.asarray(self.has_extra), jnp.asarray(active), num_top=num_top)
                proposed = self.k * int(active.sum())
            else:
                drafts = np.zeros((eng.max_slots, self.k), np.int32)
                m = np.zeros(eng.max_slots, np.int32)
                for slot, hist in histories.items():
                    prop = ngram_propose(hist, self.config.ngram, self.k)
                    drafts[slot, :len(prop)], m[slot] = prop, len(prop)
                eng.state, out, count, accepted = self._ngram_round(
                    eng.run_params, eng.state, jnp.asarray(drafts), jnp.asarray(m), jnp.asarray(active), num_top=num_top)
                proposed = int(m[active].sum())
        out, count, accepted = jax.tree.map(np.asarray, out), np.asarray(count), np.asarray(accepted)
        self.has_extra = active & (count == self.k + 1)   # the draft fed d_1..d_{k-1} only
        self.extra = np.where(self.has_extra, out.tokens[:, self.k - 1], 0).astype(np.int32)
        self.counters["spec_rounds"] += 1
        self.counters["spec_proposed"] += proposed
        self.counters["spec_accepted"] += int(accepted.sum())
        return out, count

    def stats(self) -> dict:
        c = self.counters
        rate = c["spec_accepted"] / c["spec_proposed"] if c["spec_proposed"] else 0.0
        return {**c, "spec_acceptance_rate": rate}


def _has_windows(engine: Engine) -> bool:
    return bool(engine.cfg.model.attention.sliding_window)  # alternating stacks also set sliding_window


def ngram_propose(history: list[int], n_max: int, k: int) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of the last n tokens of `history`, trying n = n_max
    down to 1: the most recent occurrence followed by k tokens, else the one followed by the most (in a
    repeating run the latest occurrence overlaps the tail and leaves one token to propose); [] when none
    occurs (the row then takes a plain step)."""
    h = np.asarray(history)
    for n in range(min(n_max, len(h) - 1), 0, -1):
        tail = h[-n:]
        # windows ending before the last token: start s in [0, len - n - 1), most recent first
        win = np.lib.stride_tricks.sliding_window_view(h[:-1], n)
        hits = np.flatnonzero((win == tail).all(axis=1))
        if hits.size:
            starts = hits + n
            full = starts[len(h) - starts >= k]
            s = int(full[-1]) if full.size else int(starts[0])
            return [int(t) for t in h[s:s + k]]
    return []


def slice_out(out: SampleOut, j: int) -> SampleOut:
    """Column j of a round's [B, k+1] SampleOut, shaped like one plain step's (for Batcher._take)."""
    return SampleOut(out.tokens[:, j], out.logprobs[:, j], out.top_ids[:, j], out.top_logprobs[:, j])


def batcher_round(batcher, active: np.ndarray, num_top: int) -> None:
    """Batcher.iteration's speculative step: one round, then each slot's emitted tokens one by one through
    `_take`. A stop token / stop string / max tokens / context limit may end a sequence inside its run: its
    slot is freed and the rest of the run is dropped (the next sequence there starts from a fresh insert)."""
    spec = batcher.spec
    histories = {} if spec.draft is not None else {
        i: s.handle.prompt_ids + s.handle.outputs[s.index].token_ids for i, s in enumerate(batcher.slots)
        if s is not None}
    out, count = spec.round(active, histories, num_top)
    batcher.counters["steps"] += 1
    batcher.counters["occupied_slot_steps"] += int(active.sum())
    for i in np.flatnonzero(active):
        for j in range(int(count[i])):
            if batcher.slots[i] is None:
                break
            batcher._take(i, slice_out(out, j), i)
