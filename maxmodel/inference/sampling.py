"""Per-request sampling in one compiled function.

Every sampling setting is a per-row array (`SamplingParams`), never a static argument, so a decode batch
that mixes greedy, plain-temperature, top-k / top-p / min-p and penalised requests compiles once. The order
is vLLM's: penalties -> temperature -> top-k -> top-p -> min-p -> draw. Each row draws with its own key
`fold_in(key(seed), step)`, so a request's tokens depend only on its seed, its step and its own logits:
not on the slot it sits in, nor on what else shares the batch.

Returned log-probabilities are those of the RAW model distribution (log_softmax of the unmodified logits),
whatever penalties, temperature or filters chose the token. That is what RL objectives (GRPO/PPO ratios)
need and what vLLM returns by default. `processed_logprobs` gives the distribution actually sampled from
(after penalties, temperature and filters), e.g. for speculative decoding's acceptance test.

Host side: `SamplingOptions` is one request's settings as python values (validated with field-naming
errors, for the server's 4xx answers); `stack_params` turns a batch of them into `SamplingParams`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import secrets
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Temperatures this small are greedy (vLLM's _SAMPLING_EPS): dividing by them could overflow f32 to inf and
# the draw would be the argmax anyway.
GREEDY_BELOW = 1e-5


def _sampled(params) -> jax.Array:
    return params.temperature >= GREEDY_BELOW


class SamplingParams(NamedTuple):
    """One entry per batch row. Off values: temperature 0 = greedy, top_k 0, top_p 1, min_p 0, penalties 0
    (repetition 1)."""
    temperature: jax.Array         # f32 [B]; 0 (below GREEDY_BELOW) = greedy: argmax of the penalised logits
    top_k: jax.Array               # i32 [B]; 0 (or >= V) = off
    top_p: jax.Array               # f32 [B]; 1.0 = off
    min_p: jax.Array               # f32 [B]; 0.0 = off
    repetition_penalty: jax.Array  # f32 [B]; 1.0 = off. CTRL/HF: seen token's logit > 0 -> /p, else *p
    presence_penalty: jax.Array    # f32 [B]; 0 = off. OpenAI: -= p * (count > 0), output tokens only
    frequency_penalty: jax.Array   # f32 [B]; 0 = off. OpenAI: -= p * count, output tokens only
    seed: jax.Array                # u32 [B]


class SampleOut(NamedTuple):
    tokens: jax.Array        # i32 [B]
    logprobs: jax.Array      # f32 [B]: raw-model log-probability of `tokens`
    top_ids: jax.Array       # i32 [B, num_top]: the raw model's num_top most likely tokens, best first
    top_logprobs: jax.Array  # f32 [B, num_top]: their raw log-probabilities


def apply_penalties(logits, params: SamplingParams, output_counts, prompt_mask):
    """Repetition (prompt and output tokens), then frequency and presence (output tokens only), as vLLM."""
    logits = logits.astype(jnp.float32)
    counts = output_counts.astype(jnp.float32)
    seen = prompt_mask | (output_counts > 0)
    rep = params.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - params.frequency_penalty[:, None] * counts
    return logits - params.presence_penalty[:, None] * (counts > 0)


def _sort_cutoff(x, params: SamplingParams):
    """Per-row logit threshold implementing top-k then top-p on the temperature-scaled logits `x`.

    Top-p is taken over the top-k-renormalised distribution (vLLM, HF) and keeps the smallest prefix of the
    sorted tokens whose mass reaches p: a token stays iff the mass strictly before it is < p. The result is a
    value threshold (x >= cutoff), so tokens tied with the last kept one stay too; a row with both filters
    off gets its minimum logit, which keeps every token, bit-identically to the no-sort branch."""
    vocab = x.shape[-1]
    s = -jnp.sort(-x, axis=-1)  # descending
    pos = jnp.arange(vocab)[None, :]
    k = jnp.where((params.top_k > 0) & (params.top_k < vocab), params.top_k, vocab)[:, None]
    in_k = pos < k
    probs = jax.nn.softmax(jnp.where(in_k, s, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    # top_p == 1 must keep everything: the float mass before a tiny tail token can round up to 1.0.
    in_p = (before < params.top_p[:, None]) | (params.top_p[:, None] >= 1.0)
    n = jnp.maximum(jnp.sum(in_k & in_p, axis=-1), 1)  # at least one token, even for top_p <= 0
    return jnp.take_along_axis(s, (n - 1)[:, None], axis=-1)


def _filter(logits, params: SamplingParams, output_counts, prompt_mask):
    """(penalised logits, temperature-scaled logits with -inf outside the allowed set)."""
    penalised = apply_penalties(logits, params, output_counts, prompt_mask)
    x = penalised / jnp.where(_sampled(params), params.temperature, 1.0)[:, None]
    vocab = x.shape[-1]
    # The sort is O(V log V) per row: skip it unless some sampled (non-greedy) row filters by rank.
    ranked = ((params.top_k > 0) & (params.top_k < vocab)) | (params.top_p < 1.0)
    needs_sort = jnp.any(_sampled(params) & ranked)
    cutoff = jax.lax.cond(needs_sort, _sort_cutoff, lambda x, p: jnp.full((x.shape[0], 1), -jnp.inf, x.dtype),
                          x, params)
    x = jnp.where(x >= cutoff, x, -jnp.inf)
    # min-p: a ratio to the most likely token, unchanged by renormalisation over the kept set.
    probs = jax.nn.softmax(x, axis=-1)
    x = jnp.where(probs >= params.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True), x, -jnp.inf)
    return penalised, x


@jax.jit
def processed_logprobs(logits, params: SamplingParams, output_counts, prompt_mask):
    """[B, V] log-probabilities of the distribution `sample` draws from (penalties, temperature, top-k,
    top-p, min-p; -inf outside the kept set). Greedy rows (temperature < GREEDY_BELOW) get the point mass
    on their argmax: 0 there, -inf elsewhere."""
    penalised, x = _filter(logits, params, output_counts, prompt_mask)
    greedy = jax.nn.one_hot(argmax(penalised), x.shape[-1], dtype=jnp.bool_)
    greedy_lp = jnp.where(greedy, 0.0, -jnp.inf)
    return jnp.where(_sampled(params)[:, None], jax.nn.log_softmax(x, axis=-1), greedy_lp)


def _inverse_cdf(keys, x):
    """One draw per row from softmax(x) (-inf = excluded) by inverting its CDF with a single uniform per row:
    exact like a Gumbel-max draw, but one random number per row instead of one per vocabulary entry (which
    on a CPU costs more than the model's decode step at a 32k vocabulary)."""
    probs = jax.nn.softmax(x, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.vmap(jax.random.uniform)(keys) * cdf[:, -1]
    idx = jnp.sum(cdf <= u[:, None], axis=-1)  # the first token whose CDF passes u: P(token) = its prob
    last = x.shape[-1] - 1 - jnp.argmax((probs > 0)[:, ::-1], axis=-1)  # rounding at the top: a kept token
    return jnp.minimum(idx, last)


def _row_keys(seed, step):
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seed.astype(jnp.uint32), step)


def _top(raw_logprobs, num_top: int):
    if num_top == 0:  # lax.top_k rejects k=0
        shape = raw_logprobs.shape[:-1] + (0,)
        return jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32)
    values, ids = jax.lax.top_k(raw_logprobs, num_top)
    return ids.astype(jnp.int32), values


@functools.partial(jax.jit, static_argnames="num_top")
def sample(logits, params: SamplingParams, step, output_counts, prompt_mask, num_top: int = 0) -> SampleOut:
    """Draw one token per row.

    logits [B, V] raw model logits (any float dtype; computed in f32); step [B] i32 index of the token being
    generated for each request (0 for its first new token): the row's key is fold_in(key(seed), step);
    output_counts [B, V] i32 counts of the tokens generated so far; prompt_mask [B, V] bool, the tokens
    present in the prompt (repetition penalty only). `num_top` (static) is how many raw top alternatives
    to return; keep it fixed (e.g. 20, the API's maximum) to compile once.

    `logprobs` / `top_logprobs` are of the RAW model distribution, log_softmax(logits), not of the
    penalised / tempered / filtered one (see `processed_logprobs` for that)."""
    def drawn():
        penalised, x = _filter(logits, params, output_counts, prompt_mask)
        return jnp.where(_sampled(params), _inverse_cdf(_row_keys(params.seed, step), x),
                         argmax(penalised)).astype(jnp.int32)

    def greedy():
        return argmax(apply_penalties(logits, params, output_counts, prompt_mask))
    # An all-greedy batch (evaluation, greedy serving) skips the filters and the draw altogether.
    tokens = jax.lax.cond(jnp.any(_sampled(params)), drawn, greedy)
    return SampleOut(tokens, *raw_logprobs(logits, tokens, num_top))


def argmax(x):
    """jnp.argmax over the last axis (the first index of the maximum) as two plain reductions, which XLA:CPU
    runs ~2.5x faster over a [16, 32768] row block than argmax's paired (value, index) reduction."""
    top = jnp.max(x, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(x == top, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1)
    return jnp.minimum(first, x.shape[-1] - 1)  # a NaN row matches nowhere: its last index


def raw_logprobs(logits, tokens, num_top: int):
    """(raw logprob of `tokens` [B], top ids, top logprobs) with the arithmetic of jax.nn.log_softmax, but
    only at the entries returned: no [B, V] log-softmax is written."""
    x = logits.astype(jnp.float32)
    top = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    norm = jnp.log(jnp.sum(jnp.exp(x - top), axis=-1, keepdims=True))
    picked = (jnp.take_along_axis(x, tokens[:, None], axis=-1) - top) - norm
    if num_top == 0:
        top_ids, top_lp = _top(x, 0)
    else:
        values, top_ids = jax.lax.top_k(x, num_top)
        top_ids, top_lp = top_ids.astype(jnp.int32), (values - top) - norm
    return picked[:, 0], top_ids, top_lp


@functools.partial(jax.jit, static_argnames="num_top")
def token_logprobs(logits, tokens, num_top: int = 0):
    """Raw log-probabilities of given tokens, for prompt logprobs (`echo`) and scoring.

    logits [B, T, V], tokens [B, T]: logits[:, t] must be the distribution tokens[:, t] came from, i.e. the
    caller shifts (the logits of positions 0..T-2 score tokens 1..T-1; the first prompt token has none).
    Returns (logprobs [B, T], top_ids [B, T, num_top], top_logprobs [B, T, num_top])."""
    raw = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_ids, top_lp = _top(raw, num_top)
    return jnp.take_along_axis(raw, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0], top_ids, top_lp


def count_tokens(output_counts, tokens, active):
    """output_counts after appending `tokens` [B] to the rows where `active` [B] is true."""
    rows = jnp.arange(tokens.shape[0])
    return output_counts.at[rows, tokens].add(active.astype(output_counts.dtype))


def prompt_token_mask(prompt_ids, valid, vocab_size: int):
    """[B, V] bool: which tokens occur in each row's prompt. prompt_ids [B, T]; valid [B, T] bool is false
    on padding."""
    hits = jnp.zeros((prompt_ids.shape[0], vocab_size), jnp.int32)
    rows = jnp.broadcast_to(jnp.arange(prompt_ids.shape[0])[:, None], prompt_ids.shape)
    return hits.at[rows, prompt_ids].max(valid.astype(jnp.int32)) > 0


# ---------------------------------------------------------------- host side

MAX_N = 128
MAX_LOGPROBS = 20


def seed_to_u32(seed: int) -> int:
    """Any python int (OpenAI seeds are 64-bit, may be negative) folded to the u32 the device key takes."""
    s = seed % (1 << 64)
    return (s ^ (s >> 32)) & 0xFFFFFFFF


def _mix(seed: int, index: int) -> int:
    """A distinct u32 per sample index (splitmix64 finaliser), so the n samples of a request differ."""
    z = (seed + 0x9E3779B97F4A7C15 * index) % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return seed_to_u32(z ^ (z >> 31))


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return (_is_int(v) or isinstance(v, (float, np.floating))) and math.isfinite(v)


@dataclasses.dataclass
class SamplingOptions:
    """One request's sampling settings as python values. `seed=None` draws a random seed on the host at
    construction, so the request keeps one seed for all its steps (and can be logged and replayed)."""
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None   # number of top alternatives returned per token, 0..20
    echo: bool = False            # also return the prompt (and its logprobs when logprobs is set)
    n: int = 1
    best_of: int | None = None    # None = n

    def __post_init__(self):
        if self.seed is None:
            self.seed = secrets.randbits(32)
        if isinstance(self.stop, str):  # the OpenAI API takes a string or a list
            self.stop = [self.stop]

    def validate(self, vocab_size: int | None = None) -> SamplingOptions:
        """Raise ValueError("<field>: ...") for the first bad field; return self."""
        def bad(field, why):
            raise ValueError(f"{field}: {why}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", f"must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or self.temperature < 0:
            bad("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be a number > 0 (1 = off), got {self.repetition_penalty!r}")
        for field in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, field)
            if not _is_real(v) or not -2 <= v <= 2:
                bad(field, f"must be in [-2, 2], got {v!r}")
        if not _is_int(self.seed):
            bad("seed", f"must be an integer or null, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", f"must be a non-empty string or a list of them, got {self.stop!r}")
        in_vocab = lambda t: _is_int(t) and t >= 0 and (vocab_size is None or t < vocab_size)
        if not isinstance(self.stop_token_ids, list) or not all(in_vocab(t) for t in self.stop_token_ids):
            bad("stop_token_ids", f"must be a list of token ids in [0, {vocab_size or 'vocab'}), "
                                  f"got {self.stop_token_ids!r}")
        for field in ("ignore_eos", "echo"):
            if not isinstance(getattr(self, field), bool):
                bad(field, f"must be true or false, got {getattr(self, field)!r}")
        lp = self.logprobs
        if lp is not None and (not _is_int(lp) or not 0 <= lp <= MAX_LOGPROBS):
            bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or null, got {self.logprobs!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            bad("n", f"must be an integer in [1, {MAX_N}], got {self.n!r}")
        if self.best_of is not None and (not _is_int(self.best_of) or not self.n <= self.best_of <= MAX_N):
            bad("best_of", f"must be an integer in [n={self.n}, {MAX_N}] or null, got {self.best_of!r}")
        return self

    @property
    def num_samples(self) -> int:
        """How many sequences to generate: best_of when set (the best n are kept), else n."""
        return self.best_of if self.best_of is not None else self.n

    def sample_seed(self, index: int) -> int:
        """The u32 seed of sample `index` of this request. Sample 0 uses the request's own seed (so n=1 and
        the first of n agree); the others get distinct derived seeds."""
        return seed_to_u32(self.seed) if index == 0 else _mix(self.seed, index)


def stack_params(options: list[SamplingOptions], pad_to: int,
                 seeds: list[int] | None = None) -> SamplingParams:
    """Batch rows of `SamplingParams` from per-row options (one row = one sequence), padded to `pad_to` with
    greedy, filter-free rows. `seeds` (u32, one per option) overrides the options' own seeds, e.g.
    `[opt.sample_seed(i) ...]` for the i-th sample of an n>1 request."""
    if len(options) > pad_to:
        raise ValueError(f"{len(options)} rows do not fit in a batch of {pad_to}")
    if seeds is not None and len(seeds) != len(options):
        raise ValueError(f"seeds: {len(seeds)} given for {len(options)} rows")
    cols = {f: np.zeros(pad_to, np.float32) for f in SamplingParams._fields}
    cols.update(top_k=np.zeros(pad_to, np.int32), seed=np.zeros(pad_to, np.uint32),
                top_p=np.ones(pad_to, np.float32), repetition_penalty=np.ones(pad_to, np.float32))
    for i, opt in enumerate(options):
        for f in SamplingParams._fields:
            if f != "seed":
                cols[f][i] = getattr(opt, f)
        cols["seed"][i] = seed_to_u32(opt.seed) if seeds is None else seeds[i]
    return SamplingParams(**{f: jnp.asarray(cols[f]) for f in SamplingParams._fields})
