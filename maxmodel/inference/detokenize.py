"""Incremental detokenization with stop strings, on the host, one object per generated sequence.

Text is never decoded token by token (a sentencepiece piece's leading space depends on what precedes it,
a UTF-8 character can be split over several byte-fallback / byte-level tokens): each push decodes a short
window of ids and takes the difference from the same window without the new ids, the prefix/read-offset
scheme of vLLM and TGI. The window restarts only where the decoded text ends in a complete character, so
the result equals decoding the whole generated sequence (after the prompt) at a cost that does not grow
with its length. Text ending in U+FFFD (an incomplete UTF-8 sequence so far) is held until the next token
completes it, or until `finish()`, where a sequence that stays incomplete is what `decode` gives too.

Stop strings (OpenAI semantics): the output ends just before the first occurrence of any stop string,
which is not included. Text that could be the start of a stop string is held back until it either
completes one (then it is dropped) or cannot anymore (then it is released), so no part of a stop string
is ever emitted.
"""
from __future__ import annotations

import os

REPLACEMENT = "\ufffd"
# Prompt ids decoded in front of the first generated ones: enough for a leading space or a merge to come
# out as it does after the prompt (vLLM uses 5).
PROMPT_CONTEXT = 6


class IncrementalDetokenizer:
    """push(token_id) -> newly safe text; stopped / stop_string once a stop string appeared; finish() ->
    the held-back remainder at the end of the sequence. `text` is everything emitted so far.

    The tokenizer needs only `decode(ids) -> str` (all of maxmodel.data.tokenizer's have it). Push only
    tokens meant to become text: the EOS / stop_token_ids that end a sequence are the engine's to drop."""

    def __init__(self, tokenizer, prompt_ids=(), stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.token_ids: list[int] = []  # every pushed id, including the one that completed a stop string
        self.stopped = False
        self.stop_string: str | None = None  # which stop string ended the text
        context = [int(i) for i in list(prompt_ids)[-PROMPT_CONTEXT:]]
        self._ids = context       # context + generated ids
        self._prefix = 0          # window start: decode(_ids[_prefix:]) minus decode(_ids[_prefix:_read])
        self._read = len(context)  # ids before _read are already in _decoded
        self._decoded = ""        # generated text so far, ending in a complete character
        self._emitted = 0         # how much of _decoded has been handed out
        self._finished = False

    @property
    def text(self) -> str:
        return self._decoded[:self._emitted]

    def push(self, token_id) -> str:
        """Add one generated token; return the text that became safe to show. After a stop string (or
        finish) it returns "" and ignores the token: tokens already in flight on the device are harmless."""
        if self.stopped or self._finished:
            return ""
        token_id = int(token_id)
        self.token_ids.append(token_id)
        self._ids.append(token_id)
        new = self._window_text()
        # An incomplete UTF-8 sequence at the end decodes to U+FFFD that a later token may turn into a real
        # character: keep the window open and emit nothing new yet. Ids decoding to no text wait likewise.
        if new and not new.endswith(REPLACEMENT):
            self._decoded += new
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence ended (EOS, stop token, length): return everything still held back."""
        if self.stopped or self._finished:
            return ""
        self._finished = True
        self._decoded += self._window_text()  # an incomplete trailing sequence stays U+FFFD, as decode gives
        self._read = len(self._ids)
        return self._release(final=True)

    def _window_text(self) -> str:
        before = self.tokenizer.decode(self._ids[self._prefix:self._read])
        full = self.tokenizer.decode(self._ids[self._prefix:])
        if not full.startswith(before):
            # Only where the prompt ended inside a character (e.g. a continuation of a cut-off generation)
            # that the new ids complete: its U+FFFD turned into the character, which counts as generated.
            before = os.path.commonprefix([before, full])
        return full[len(before):]

    def _release(self, final: bool) -> str:
        start, text = self._emitted, self._decoded
        # No stop string starts before `start`: any that did would have been found, or its beginning would
        # have been held back, when that text was released.
        hits = [(i, s) for s in self.stop if (i := text.find(s, start)) >= 0]
        if hits:
            end, self.stop_string = min(hits)
            self.stopped = True
            self._decoded = text[:end]
        else:
            end = len(text) if final else len(text) - self._partial_stop_suffix(text, start)
        self._emitted = end
        return text[start:end]

    def _partial_stop_suffix(self, text: str, start: int) -> int:
        """Length of the longest suffix of text[start:] that is a proper prefix of some stop string."""
        longest = min(max((len(s) for s in self.stop), default=1) - 1, len(text) - start)
        for k in range(longest, 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
