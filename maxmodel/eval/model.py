"""The model an evaluation runs: the packed scorer for log-likelihoods, the generation engine (when there is
one) for generative tasks, and the tokenizer. Loaded from a run or model directory (the generation engine's
loader: its mesh, restore and tokenizer), or made from the trainer's live parameters."""
from __future__ import annotations

import dataclasses

from .scoring import PackedScorer, Score


@dataclasses.dataclass
class EvalModel:
    scorer: PackedScorer
    tokenizer: object
    generator: object | None = None  # inference.generator.Generator; None: log-likelihood tasks only
    name: str = "model"

    @property
    def max_length(self) -> int:
        return self.scorer.max_len

    @classmethod
    def load(cls, path, overrides=(), max_length: int = 0, batch_rows: int = 16, row_len: int = 256,
             max_batch: int = 16) -> EvalModel:
        """A run directory (latest checkpoint) or model directory; `overrides` are config key=value.
        `max_length`: the longest sequence scored or generated (0 = model.max_seq_len)."""
        from maxmodel.inference.load import load_engine
        generator = load_engine(path, list(overrides), max_slots=max_batch)
        e = generator.engine  # the scorer shares the engine's weights, mesh and rules (no second copy)
        scorer = PackedScorer(e.cfg, e.graphdef, e.run_params, e.mesh, e.rules, max_len=max_length, rows=batch_rows,
                              row_len=row_len)
        return cls(scorer, generator.tokenizer, generator, generator.model_name)

    # ---- text

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """As the generation engine encodes prompts: a Hugging Face tokenizer.json's post-processor decides
        the special tokens (what transformers gives the same model); maxmodel's own tokenizers start a
        document with BOS, as training did. `bos=False`: text alone."""
        inner = getattr(self.tokenizer, "tok", None)
        if inner is not None and hasattr(inner, "post_processor"):
            return inner.encode(text, add_special_tokens=bos).ids
        ids = self.tokenizer.encode(text)
        return [self.tokenizer.bos_id, *ids] if bos else ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval splits them: trailing spaces of the context move to
        the continuation, and the continuation's ids are the whole text's after the context's (so the
        tokens at the boundary are the ones the model would see in running text)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    # ---- scoring

    def score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[Score]:
        """log p(continuation | context) per (context ids, continuation ids); too long: cut from the left
        to max_length + 1 tokens (lm-eval's hf backend does the same)."""
        sequences = []
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("cannot score an empty continuation")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            sequences.append((whole, max(1, len(whole) - len(continuation))))
        return self.scorer.score(sequences)

    def loglikelihoods(self, pairs: list[tuple[str, str]]) -> list[Score]:
        return self.score_pairs([self.encode_pair(c, x) for c, x in pairs])

    # ---- generating

    def generate(self, prompts: list[list[int]], options: list) -> list[str]:
        """Greedy or sampled completions (inference.sampling.SamplingOptions each), all in one continuous
        batch, as text (`decode`); prompts are cut from the left to leave room for max_new_tokens."""
        if self.generator is None:
            raise ValueError("this task generates text and needs the generation engine; during training only "
                             "log-likelihood and perplexity tasks run")
        import jax
        if jax.process_count() > 1:
            raise ValueError("generative tasks run on one host (the engine's batcher is per process); "
                             "multi-host evaluation scores log-likelihood and perplexity tasks")
        limit = min(self.generator.max_len, self.max_length)
        ids = []
        for p, o in zip(prompts, options):
            if o.max_new_tokens >= limit:
                raise ValueError(f"max_gen_toks={o.max_new_tokens} leaves no room for a prompt in max_len {limit}")
            ids.append(list(p)[-(limit - o.max_new_tokens):])
        return [self.decode(out.completions[0].token_ids) for out in self.generator.generate(ids, options)]

    def decode(self, ids) -> str:
        """Generated ids as text without special tokens (a BOS or EOS the model emits is not part of an
        answer; lm-eval's hf backend decodes so too). Callers cut the text at their stop strings."""
        inner = getattr(self.tokenizer, "tok", None)
        if inner is not None:
            return inner.decode([int(i) for i in ids], skip_special_tokens=True)
        special = {self.tokenizer.bos_id, self.tokenizer.eos_id, getattr(self.tokenizer, "pad_id", None)}
        return self.tokenizer.decode([int(i) for i in ids if int(i) not in special])
