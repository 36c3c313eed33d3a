"""The device side of generation: prefill, insert into a slot, one decode step for every slot.

The decode batch has `max_slots` rows ("slots"). A request is prefilled on a one-row cache of its own (in
chunks of the largest prefill bucket; the last chunk padded up to the smallest bucket that holds it, so a
handful of prompt shapes compile), then inserted into a free slot, where its first token is sampled. Every
`step` then writes each active slot's last token into the cache and samples the next one, all rows at once,
each with its own sampling parameters and seed (sampling.py). Slots join and leave between steps: that is
continuous batching (batcher.py drives it).

Every function is compiled once per shape and takes the parameters as an argument, so `set_params` swaps
weights (the RL trainer's new policy) without recompiling. Everything runs under the engine's mesh and
logical-axis rules: parameters keep their training shardings, cache rows go over the batch axes and kv heads
over `tensor` (kv_cache.CACHE_AXES).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxmodel.models import kv_cache
from maxmodel.models.layers import fuse_projections, unfuse_projections
from maxmodel.models.sharding import constrain

from .sampling import (
    MAX_LOGPROBS,
    SampleOut,
    SamplingParams,
    count_tokens,
    prompt_token_mask,
    sample,
    token_logprobs,
)


@dataclasses.dataclass
class EngineOptions:
    max_slots: int = 16                   # rows of the decode batch
    max_len: int = 0                      # longest prompt + completion; 0 = model.max_seq_len
    prefill_buckets: tuple[int, ...] = (32, 64, 128, 256, 512)  # prompt chunk lengths (the largest = chunk size)
    spare: int = 0                        # extra ring slots in sliding-window caches (speculative tokens)
    kv_int8: bool = False                 # int8 KV cache with per-(row, head, position) scales
    num_top: int = MAX_LOGPROBS           # top-N alternatives computed when a request asks for logprobs


class DecodeState(NamedTuple):
    """Everything the decode step reads per slot (rows = slots)."""
    cache: dict
    lengths: jax.Array      # [B] i32 tokens in the cache
    tokens: jax.Array       # [B] i32 the last sampled token, written at position `lengths` by the next step
    steps: jax.Array        # [B] i32 tokens generated so far (the sampler's key index)
    counts: jax.Array       # [B, V] i32 generated-token counts (penalties)
    prompt_mask: jax.Array  # [B, V] bool tokens of the prompt (repetition penalty)
    params: SamplingParams  # [B] each


def _batch_axis(group: str) -> int:
    return 0 if "." in group else 1  # unrolled layers: [B, ...]; scanned stacks: [units, B, ...]


def constrain_cache(cache: dict) -> dict:
    def pin(group, x):
        lead = (None,) * _batch_axis(group)
        return constrain(x, lead + (kv_cache.CACHE_AXES if x.ndim - len(lead) == 4 else kv_cache.SCALE_AXES))
    return {g: [{k: pin(g, x) for k, x in c.items()} for c in caches] for g, caches in cache.items()}


def _head_to_vocab_major(head):
    """An untied head's variable [d_model, vocab] as [vocab, d_model], its sharding names swapped with it."""
    names = head.get_metadata().get("out_sharding")
    value = jnp.swapaxes(head.get_value(), 0, 1)
    sharding = getattr(head.get_value(), "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
        value = jax.device_put(value, jax.sharding.NamedSharding(sharding.mesh, jax.P(spec[1], spec[0])))
    head = head.replace(value)
    if names:
        head.set_metadata("out_sharding", tuple(reversed(names)))
    return head


def decode_layout(graphdef, params):
    """(graphdef, params) as the engine computes with them. On XLA:CPU (other backends choose their layouts
    themselves: unchanged there), measured with benchmarks/decode_profile.py on bench-50m:
      * an untied float head is stored [vocab, d_model] (`Transformer.head_vocab_major`): the [B, d] x [d, V]
        product of a decode step runs ~1.4x faster with the weight's rows along the vocabulary (2-3 ms of a
        29 ms step at batch 16);
      * each layer's q/k/v and gated-MLP up/gate weights are stored joined (layers.fuse_projections): one
        product instead of two or three, ~10% of the layers' time at batch 1."""
    if jax.default_backend() != "cpu":
        return graphdef, params
    model = nnx.merge(graphdef, params)
    changed = False
    for _, module in nnx.iter_modules(model):
        changed |= fuse_projections(module)
    head = getattr(model, "head", None)
    if (isinstance(head, nnx.Param) and not model.head_vocab_major and isinstance(head.get_value(), jax.Array)
            and head.get_value().ndim == 2 and jnp.issubdtype(head.get_value().dtype, jnp.floating)):
        model.head = _head_to_vocab_major(head)
        model.head_vocab_major = changed = True
    return nnx.split(model) if changed else (graphdef, params)


def given_layout(graphdef, params):
    """decode_layout undone: the weights as the model stores them."""
    model = nnx.merge(graphdef, params)
    for _, module in nnx.iter_modules(model):
        if getattr(module, "fused", None) is not None:
            unfuse_projections(module)
    if model.head_vocab_major:
        model.head = _head_to_vocab_major(model.head)  # a swap undoes itself
        model.head_vocab_major = False
    return nnx.split(model)[1]


class Engine:
    def __init__(self, cfg, graphdef, params, mesh, rules, options: EngineOptions | None = None):
        self.cfg, self.mesh, self.rules = cfg, mesh, rules
        self._given = jax.tree.map(lambda x: (x.shape, x.dtype), params)  # what set_params must match
        self._graphdef_given = graphdef
        with jax.set_mesh(mesh):
            graphdef, params = decode_layout(graphdef, params)
        self.graphdef = graphdef  # of run_params
        self.options = opts = options or EngineOptions()
        self.max_len = min(opts.max_len or cfg.model.max_seq_len, cfg.model.max_seq_len)
        self.vocab_size = cfg.model.vocab_size
        batch_shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp", "expert") if a in mesh.shape]))
        self.max_slots = -(-opts.max_slots // batch_shards) * batch_shards  # whole rows per batch shard
        self.buckets = tuple(sorted(b for b in opts.prefill_buckets if b <= self.max_len)) or (self.max_len,)
        self.run_params = params  # the weights in decode_layout: what the compiled functions take
        self._params = None       # the given layout, rebuilt on demand (the `params` property)
        self.traces = collections.Counter()  # how often each function was traced (= compiled)
        self.on_params_changed: list = []     # callbacks (the prefix cache drops its blocks)
        self._prefill = jax.jit(self._prefill_fn, static_argnames="echo", donate_argnums=1)
        self._insert = jax.jit(self._insert_fn, static_argnames="num_top", donate_argnums=0)
        self._step = jax.jit(self._step_fn, static_argnames="num_top", donate_argnums=1)
        self._forward = jax.jit(lambda params, tokens: self._model(params)(tokens))
        self._new_row = jax.jit(lambda params: constrain_cache(self._model(params).init_cache(
            1, self.max_len, opts.spare, opts.kv_int8)))
        with self.context():
            self.state = jax.jit(self._init_state_fn)(params)

    # ---- plumbing

    @contextlib.contextmanager
    def context(self):
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            yield

    def _model(self, params):
        return nnx.merge(self.graphdef, params)

    def _init_state_fn(self, params):
        b, v = self.max_slots, self.vocab_size
        cache = constrain_cache(self._model(params).init_cache(b, self.max_len, self.options.spare,
                                                               self.options.kv_int8))
        zeros = jnp.zeros((b,), jnp.int32)
        sp = SamplingParams(*(jnp.zeros((b,), jnp.uint32 if f == "seed" else jnp.int32 if f == "top_k"
                                        else jnp.float32) for f in SamplingParams._fields))
        return DecodeState(cache, zeros, zeros, zeros, jnp.zeros((b, v), jnp.int32), jnp.zeros((b, v), bool), sp)

    @property
    def params(self):
        """The weights in the layout the engine was given (and set_params takes): run_params with any
        decode_layout change undone."""
        if self._params is None:
            self._params = given_layout(self.graphdef, self.run_params)
        return self._params

    def set_params(self, params) -> None:
        """Swap the weights in place (same tree, shapes and dtypes: nothing recompiles)."""
        new = jax.tree.map(lambda x: (x.shape, x.dtype), params)
        if jax.tree.structure(self._given) != jax.tree.structure(new) or self._given != new:
            raise ValueError("params: the new weights do not have the tree, shapes and dtypes of the engine's")
        with jax.set_mesh(self.mesh):
            _, self.run_params = decode_layout(self._graphdef_given, params)
        self._params = None  # not the caller's arrays: a trainer may donate those to its next step
        for callback in self.on_params_changed:
            callback()

    # ---- compiled functions

    def _prefill_fn(self, params, cache, tokens, start, n_valid, targets, echo: bool):
        """One chunk of one prompt (tokens [1, P], `n_valid` real) after `start` cached tokens. Returns the
        cache, the logits after the chunk's last real token and, with `echo`, the raw log-probabilities (and
        top alternatives) of `targets` [1, P] (each position's next prompt token)."""
        self.traces["prefill", tokens.shape[1], echo] += 1
        model = self._model(params)
        p = tokens.shape[1]
        positions = jnp.where(jnp.arange(p)[None] < n_valid[:, None], start[:, None] + jnp.arange(p)[None], -1)
        h, cache = model.decode(tokens, positions, start, cache)
        last = jnp.take_along_axis(h, (n_valid - 1)[:, None, None], axis=1)
        logits = model.logits(last)[:, 0].astype(jnp.float32)
        scored = token_logprobs(model.logits(h), targets, self.options.num_top) if echo else None
        return constrain_cache(cache), logits, scored

    def _insert_fn(self, state: DecodeState, row_cache, logits, slot, length, prompt_ids, sp: SamplingParams,
                   num_top: int):
        """Put a prefilled row into `slot` and sample its first token there with the row's own `sp` [1]."""
        self.traces["insert", num_top] += 1
        cache = {g: [{k: jax.lax.dynamic_update_slice_in_dim(big[k], row[k], slot, _batch_axis(g))
                      for k in big} for big, row in zip(state.cache[g], row_cache[g])] for g in state.cache}
        prompt_mask = prompt_token_mask(prompt_ids, prompt_ids >= 0, self.vocab_size)
        zeros = jnp.zeros((1,), jnp.int32)
        out = sample(logits, sp, zeros, jnp.zeros((1, self.vocab_size), jnp.int32), prompt_mask, num_top)
        counts = count_tokens(jnp.zeros((1, self.vocab_size), jnp.int32), out.tokens, jnp.ones((1,), bool))

        def put(x, row):
            return jax.lax.dynamic_update_slice_in_dim(x, row.astype(x.dtype), slot, 0)
        state = DecodeState(constrain_cache(cache), put(state.lengths, length[None]), put(state.tokens, out.tokens),
                            put(state.steps, jnp.ones((1,), jnp.int32)), put(state.counts, counts),
                            put(state.prompt_mask, prompt_mask),
                            SamplingParams(*(put(a, b) for a, b in zip(state.params, sp))))
        return state, out

    def _step_fn(self, params, state: DecodeState, active, num_top: int):
        """One token for every active slot (inactive rows compute but write and advance nothing)."""
        self.traces["step", num_top] += 1
        model = self._model(params)
        positions = jnp.where(active, state.lengths, -1)[:, None]
        h, cache = model.decode(state.tokens[:, None], positions, state.lengths, state.cache)
        logits = model.logits(h)[:, 0].astype(jnp.float32)
        out = sample(logits, state.params, state.steps, state.counts, state.prompt_mask, num_top)
        step = active.astype(jnp.int32)
        state = DecodeState(constrain_cache(cache), state.lengths + step, jnp.where(active, out.tokens, state.tokens),
                            state.steps + step, count_tokens(state.counts, out.tokens, active), state.prompt_mask,
                            state.params)
        return state, out

    # ---- host API

    def bucket(self, n: int) -> int:
        return next((b for b in self.buckets if b >= n), self.buckets[-1])

    def new_row(self):
        with self.context():
            return self._new_row(self.run_params)

    def prefill(self, prompt_ids: list[int], row=None, start: int = 0, echo: bool = False):
        """Prefill `prompt_ids[start:]` onto `row` (a one-row cache holding the first `start` tokens; a new
        one by default). Returns (row cache, logits after the last token [1, V], echo scores or None): with
        `echo`, per prompt position t >= start + 1 (raw logprob of token t, top ids, top logprobs) as numpy."""
        n = len(prompt_ids)
        if not start < n <= self.max_len:
            raise ValueError(f"prompt: {n} tokens do not fit the engine's max_len {self.max_len}"
                             if n > self.max_len else "prompt: empty")
        row = self.new_row() if row is None else row
        scores, chunk = [], self.buckets[-1]
        with self.context():
            while start < n:
                m = min(chunk, n - start)
                size = self.bucket(m)
                tokens = np.zeros((1, size), np.int32)
                tokens[0, :m] = prompt_ids[start:start + m]
                targets = np.zeros((1, size), np.int32)
                nxt = prompt_ids[start + 1:start + m + 1]
                targets[0, :len(nxt)] = nxt
                row, logits, scored = self._prefill(self.run_params, row, jnp.asarray(tokens), jnp.asarray([start]),
                                                    jnp.asarray([m]), jnp.asarray(targets), echo=echo)
                if echo:
                    scores.append(tuple(np.asarray(a)[0, :len(nxt)] for a in scored))
                start += m
        if not echo:
            return row, logits, None
        return row, logits, tuple(np.concatenate(parts) for parts in zip(*scores))

    def insert(self, row, logits, slot: int, prompt_ids: list[int], sp: SamplingParams, num_top: int = 0):
        """Row into `slot`; returns the first token's SampleOut (numpy)."""
        ids = np.full((1, self.max_len), -1, np.int32)
        ids[0, :len(prompt_ids)] = prompt_ids
        with self.context():
            self.state, out = self._insert(self.state, row, logits, jnp.int32(slot), jnp.int32(len(prompt_ids)),
                                           jnp.asarray(ids), sp, num_top=num_top)
        return jax.tree.map(np.asarray, out)

    def step(self, active: np.ndarray, num_top: int = 0) -> SampleOut:
        """One decode step for the slots where `active` [max_slots] is true; returns numpy SampleOut."""
        with self.context():
            self.state, out = self._step(self.run_params, self.state, jnp.asarray(active), num_top=num_top)
        return jax.tree.map(np.asarray, out)

    def logits_of(self, tokens: np.ndarray) -> Any:
        """Plain forward pass logits [B, L, V] (no cache): the oracle the tests compare against."""
        with self.context():
            return self._forward(self.run_params, jnp.asarray(tokens))
