"""One object for everything that generates (CLI, server, RL rollouts, evaluation): the engine, its
continuous batcher and the model's tokenizer and chat template."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from .batcher import Batcher
from .engine import Engine
from .sampling import SamplingOptions


class Generator:
    def __init__(self, engine: Engine, tokenizer, name: str = "model", model_dir: Path | None = None,
                 speculative=None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, name
        self.model_dir = model_dir
        self.batcher = Batcher(engine, tokenizer, eos_ids=self._eos_ids(), speculative=speculative)
        self.max_len, self.max_slots, self.vocab_size = engine.max_len, engine.max_slots, engine.vocab_size
        self.prefix_cache = None

    def attach_prefix_cache(self, cache) -> None:
        """Prefill through `cache` (a PrefixCache) and keep finished sequences' blocks (chat turns)."""
        self.prefix_cache = cache
        self.batcher.prefill = cache
        self.batcher.finish_hooks.append(cache.store_slot)

    def _eos_ids(self) -> tuple[int, ...]:
        """The tokenizer's EOS, and those a Hugging Face generation_config.json names (LLaMA 3: several)."""
        ids = {self.tokenizer.eos_id}
        config = self.model_dir / "generation_config.json" if self.model_dir else None
        if config is not None and config.is_file():
            eos = json.loads(config.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return tuple(int(i) for i in ids)

    # ---- text

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt ids as the model's tokenizer makes them: a Hugging Face tokenizer.json's post-processor
        decides BOS (so a converted model sees what transformers gives it); maxmodel's own tokenizers start
        documents with BOS, as training did."""
        inner = getattr(self.tokenizer, "tok", None)
        if inner is not None and hasattr(inner, "post_processor"):
            return inner.encode(text, add_special_tokens=True).ids
        return [self.tokenizer.bos_id] + self.tokenizer.encode(text)

    @functools.cached_property
    def chat_template(self):
        """The model's Jinja chat template (chat.py), or None for the simple template."""
        from .chat import jinja_template
        return jinja_template(self)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from .chat import render_chat
        return render_chat(self, messages, add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids of a conversation: rendered with the model's template, tokenized as it intends."""
        from .chat import encode_chat
        return encode_chat(self, messages, add_generation_prompt)

    # ---- generating

    def submit(self, prompt_ids, options: SamplingOptions, on_event=None, scorer=None):
        return self.batcher.submit(prompt_ids, options, on_event, scorer)

    def generate(self, prompts, options: SamplingOptions | list[SamplingOptions]):
        """Prompts (text or id lists) -> RequestOutputs, decoded together in the continuous batch."""
        ids = [self.encode_prompt(p) if isinstance(p, str) else list(p) for p in prompts]
        return self.batcher.generate(ids, options)

    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()

    def stats(self) -> dict:
        return self.batcher.stats() | (self.prefix_cache.stats() if self.prefix_cache is not None else {})

    def set_params(self, params) -> None:
        """New weights (e.g. the RL policy after an update); waits for the current step to finish."""
        with self.batcher._run:
            self.engine.set_params(params)
