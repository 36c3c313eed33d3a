"""Continuous batching on the host: requests wait, are prefilled into free slots, decode together, leave.

`Batcher.submit` is thread-safe and returns a `Handle` at once; the loop (`run_until_idle` in the caller's
thread, or `start()` for a background thread, as the server uses) repeats: admit waiting requests while
enough slots are free (one prefill per request, inserted into each of its n / best_of slots), then one
decode step for every active slot, then hand each slot's token to its request (stop tokens, stop strings,
max tokens, the context limit), freeing the slots of finished sequences. A request that fails in prefill
fails alone; a cancelled one (client gone) frees its slots at the next iteration.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .detokenize import IncrementalDetokenizer
from .engine import Engine
from .sampling import SamplingOptions, stack_params

log = logging.getLogger("maxmodel.inference")


@dataclasses.dataclass
class Event:
    kind: str                      # token | done | error
    index: int = 0                 # sample index within the request
    text: str = ""                 # new text
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: list | None = None  # [(token id, logprob)] best first, when the request asked for logprobs
    finish_reason: str | None = None  # stop | length (with kind=done per sample... and the last one)
    error: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)   # raw model log-probabilities of token_ids
    top_logprobs: list | None = None
    finish_reason: str | None = None

    @property
    def mean_logprob(self) -> float:
        return float(np.mean(self.logprobs)) if self.logprobs else float("-inf")


@dataclasses.dataclass
class RequestOutput:
    prompt_ids: list
    completions: list
    prompt_logprobs: list | None = None       # [None, lp(token 1), ...] with echo
    prompt_top_logprobs: list | None = None
    ttft: float | None = None                 # seconds from submit to the first token


class Handle:
    def __init__(self, prompt_ids, options: SamplingOptions, on_event, scorer):
        self.prompt_ids, self.options, self.on_event, self.scorer = list(prompt_ids), options, on_event, scorer
        self.submitted = time.perf_counter()
        self.outputs = [CompletionOutput(i, top_logprobs=[] if options.logprobs else None)
                        for i in range(options.num_samples)]
        self.prompt_scores = None
        self.first_token_at: float | None = None
        self.pending = options.num_samples
        self.cancelled = False
        self.error: str | None = None
        self._done = threading.Event()
        self._result: RequestOutput | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self.error:
            raise RuntimeError(self.error)
        return self._result

    def _emit(self, event: Event) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("on_event callback failed; cancelling the request")
                self.cancelled = True

    def _finish(self, error: str | None = None) -> None:
        self.error = error
        if error is None:
            keep = self.outputs
            if self.options.best_of is not None and self.options.best_of > self.options.n:
                score = (lambda o: self.scorer(self.prompt_ids, o)) if self.scorer else (lambda o: o.mean_logprob)
                keep = sorted(self.outputs, key=score, reverse=True)[:self.options.n]
                for i, o in enumerate(keep):
                    o.index = i
            lp, top = self.prompt_scores or (None, None)
            ttft = None if self.first_token_at is None else self.first_token_at - self.submitted
            self._result = RequestOutput(self.prompt_ids, keep, lp, top, ttft)
        self._emit(Event("error", error=error) if error else Event("done"))
        self._done.set()


@dataclasses.dataclass
class _Slot:
    handle: Handle
    index: int
    detok: IncrementalDetokenizer
    generated: int = 0


class Batcher:
    def __init__(self, engine: Engine, tokenizer, eos_ids: tuple[int, ...] = (), speculative=None):
        self.engine, self.tokenizer, self.eos_ids = engine, tokenizer, set(eos_ids)
        # speculative decoding (speculative.py): a SpeculativeConfig makes every step a draft-and-verify round
        self.spec = None
        if speculative is not None:
            from .speculative import Speculator
            self.spec = Speculator(engine, speculative)
        self.slots: list[_Slot | None] = [None] * engine.max_slots
        self.waiting: collections.deque[Handle] = collections.deque()
        self.counters = collections.Counter()
        self._lock = threading.Lock()          # guards `waiting`
        self._wake = threading.Condition(self._lock)
        self._run = threading.Lock()           # one loop iteration at a time
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.prefill = engine.prefill          # replaced by the prefix cache's caching prefill
        self.finish_hooks: list[Callable] = []  # (slot, prompt + generated ids) before a finished slot is freed

    # ---- submitting

    def submit(self, prompt_ids, options: SamplingOptions, on_event=None, scorer=None) -> Handle:
        options.validate(self.engine.vocab_size)
        if not prompt_ids:
            raise ValueError("prompt: empty")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.engine.vocab_size:
            raise ValueError(f"prompt: token ids must lie in [0, {self.engine.vocab_size})")
        if len(prompt_ids) >= self.engine.max_len:
            raise ValueError(f"prompt: {len(prompt_ids)} tokens leave no room to generate within the model's "
                             f"context of {self.engine.max_len}")
        if options.num_samples > self.engine.max_slots:
            raise ValueError(f"n: {options.num_samples} samples exceed the engine's {self.engine.max_slots} slots")
        handle = Handle(prompt_ids, options, on_event, scorer)
        with self._wake:
            self.waiting.append(handle)
            self.counters["requests"] += 1
            self._wake.notify()
        return handle

    def generate(self, prompts: list[list[int]], options: SamplingOptions | list[SamplingOptions]) -> list:
        opts = options if isinstance(options, list) else [dataclasses.replace(options) for _ in prompts]
        handles = [self.submit(p, o) for p, o in zip(prompts, opts)]
        if self._thread is None:
            self.run_until_idle()
        return [h.result() for h in handles]

    # ---- the loop

    def busy(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def run_until_idle(self) -> None:
        while self.busy():
            self.iteration()

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="maxmodel-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            with self._wake:
                self._stopping = True
                self._wake.notify()
            self._thread.join()
            self._thread = None

    def alive(self) -> bool:
        """The background loop is running (or none was started: the caller drives the loop)."""
        return self._thread is None or self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.busy():
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.iteration()
            except Exception as e:
                log.exception("decode step failed")
                for i, s in enumerate(self.slots):
                    if s is not None:
                        self._free(i)
                        if not s.handle.done():
                            s.handle._finish(f"engine error: {e}")

    def iteration(self) -> None:
        with self._run:
            self._drop_cancelled()
            self._admit()
            active = np.array([s is not None for s in self.slots])
            if not active.any():
                return
            num_top = self.engine.options.num_top if any(
                s is not None and s.handle.options.logprobs for s in self.slots) else 0
            if self.spec is not None:  # speculative round: several tokens per slot, each through _take
                from .speculative import batcher_round
                return batcher_round(self, active, num_top)
            out = self.engine.step(active, num_top)
            self.counters["steps"] += 1
            self.counters["occupied_slot_steps"] += int(active.sum())
            for i in np.flatnonzero(active):
                self._take(i, out, i)

    def _drop_cancelled(self) -> None:
        for i, s in enumerate(self.slots):
            if s is not None and s.handle.cancelled:
                self._free(i)
                if not s.handle.done():  # its other slots are freed as the loop reaches them
                    s.handle._finish("cancelled")
        with self._lock:
            for h in [h for h in self.waiting if h.cancelled]:
                self.waiting.remove(h)
                h._finish("cancelled")

    def _admit(self) -> None:
        while True:
            free = [i for i, s in enumerate(self.slots) if s is None]
            with self._lock:
                if not self.waiting or len(free) < self.waiting[0].options.num_samples:
                    return
                handle = self.waiting.popleft()
            try:
                self._start(handle, free)
            except Exception as e:
                log.exception("prefill failed")
                for i, s in enumerate(self.slots):
                    if s is not None and s.handle is handle:
                        self.slots[i] = None
                handle._finish(f"engine error: {e}")

    def _start(self, handle: Handle, free: list[int]) -> None:
        opts, prompt = handle.options, handle.prompt_ids
        row, logits, scores = self.prefill(prompt, echo=opts.echo)
        self.counters["prompt_tokens"] += len(prompt)
        if scores is not None:
            lp, top_ids, top_lp = scores
            n = opts.logprobs or 0
            handle.prompt_scores = ([None] + [float(x) for x in lp],
                                    [None] + [list(zip(map(int, i[:n]), map(float, v[:n]))) for i, v in
                                              zip(top_ids, top_lp)])
        num_top = self.engine.options.num_top if opts.logprobs else 0
        if self.spec is not None:  # the draft model's copy of the prompt in the same slots
            self.spec.prefill_insert(prompt, free[:opts.num_samples], stack_params([opts], 1))
        for index in range(opts.num_samples):
            slot = free[index]
            sp = stack_params([opts], 1, seeds=[opts.sample_seed(index)])
            out = self.engine.insert(row, logits, slot, prompt, sp, num_top)
            self.slots[slot] = _Slot(handle, index, IncrementalDetokenizer(self.tokenizer, prompt, opts.stop))
            self._take(slot, out, 0)

    def _take(self, slot: int, out, row: int) -> None:
        """Hand row `row` of a SampleOut to the sequence in `slot`."""
        s = self.slots[slot]
        h, opts = s.handle, s.handle.options
        if h.first_token_at is None:
            h.first_token_at = time.perf_counter()
        token, logprob = int(out.tokens[row]), float(out.logprobs[row])
        top = None
        if opts.logprobs:
            top = list(zip(map(int, out.top_ids[row][:opts.logprobs]), map(float, out.top_logprobs[row][:opts.logprobs])))
        o = h.outputs[s.index]
        o.token_ids.append(token)
        o.logprobs.append(logprob)
        if top is not None:
            o.top_logprobs.append(top)
        s.generated += 1
        self.counters["generated_tokens"] += 1
        finish, text = None, ""
        if token in set(opts.stop_token_ids) or (token in self.eos_ids and not opts.ignore_eos):
            finish = "stop"  # the stop token is in token_ids (RL scores it) but not in the text
        else:
            text = s.detok.push(token)
            if s.detok.stopped:
                finish = "stop"
        if finish is None and (s.generated >= opts.max_new_tokens
                               or len(h.prompt_ids) + s.generated >= self.engine.max_len):
            finish = "length"
        if finish is not None:
            text += s.detok.finish()
        o.text += text
        h._emit(Event("token", s.index, text, token, logprob, top, finish))
        if finish is not None:
            o.finish_reason = finish
            for hook in self.finish_hooks:  # the prefix cache keeps the sequence's blocks (a chat's next turn)
                hook(slot, h.prompt_ids + o.token_ids)
            self._free(slot)
            h.pending -= 1
            if h.pending == 0:
                h._finish()

    def _free(self, slot: int) -> None:
        self.slots[slot] = None

    def stats(self) -> dict[str, Any]:
        active = sum(s is not None for s in self.slots)
        return {"queue_depth": len(self.waiting), "active_slots": active, "max_slots": self.engine.max_slots,
                "requests": 0, "steps": 0, "occupied_slot_steps": 0, "prompt_tokens": 0, "generated_tokens": 0,
                **self.counters, **(self.spec.stats() if self.spec is not None else {})}
