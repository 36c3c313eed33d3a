"""lm-evaluation-harness backend `maxmodel`: lm-eval's TemplateLM over the packed scorer (loglikelihood,
loglikelihood_rolling) and the generation engine (generate_until).

    lm_eval.simple_evaluate(model="maxmodel", model_args="pretrained=RUN_OR_MODEL_DIR,max_length=512", ...)

or, in process, `MaxModelLM(scorer=..., tokenizer=..., generator=...)` (evaluation during training). Requests
are cut as lm-eval's own `hf` backend cuts them (left truncation to max_length + 1 tokens, the same rolling
windows), so the numbers compare one to one.
"""
from __future__ import annotations

import logging

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from .scoring import PackedScorer

log = logging.getLogger("maxmodel.eval")


def _flag(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes")


@register_model("maxmodel")
class MaxModelLM(TemplateLM):
    """`pretrained`: a run directory or model directory (loaded with the generation engine: its mesh,
    weights and tokenizer). `max_length`: the longest sequence in tokens (default: the engine's max_len);
    `batch_rows` / `row_len`: rows per forward pass and the shortest row; `max_batch`: decode slots for
    generate_until; `add_bos_token`: None = the tokenizer's own behaviour (a tokenizer.json's post-processor;
    BOS for maxmodel's own tokenizers, as in training); `overrides`: config overrides, `;`-separated."""

    def __init__(self, pretrained: str | None = None, max_length: int = 0, batch_rows: int = 16, row_len: int = 256,
                 max_batch: int = 16, max_gen_toks: int = 256, add_bos_token=None, overrides: str = "",
                 scorer: PackedScorer | None = None, tokenizer=None, generator=None, **unused):
        super().__init__()
        if unused:
            log.info("maxmodel backend: ignoring lm-eval arguments %s", sorted(unused))
        if scorer is None:
            if pretrained is None:
                raise ValueError("the maxmodel backend needs pretrained=DIR (a run or model directory)")
            from maxmodel.inference.load import load_engine
            generator = load_engine(pretrained, [o for o in str(overrides).split(";") if o], max_slots=int(max_batch),
                                    max_len=int(max_length))
            e = generator.engine
            scorer = PackedScorer(e.cfg, e.graphdef, e.params, e.mesh, e.rules, max_len=e.max_len,
                                  rows=int(batch_rows), row_len=int(row_len))
            tokenizer = generator.tokenizer
        self.scorer, self.generator, self.mm_tokenizer = scorer, generator, tokenizer
        self._max_length = int(max_length) or scorer.max_len
        if self._max_length > scorer.max_len:
            raise ValueError(f"max_length={self._max_length} exceeds the model's {scorer.max_len}")
        self.max_gen_toks = int(max_gen_toks)
        inner = getattr(tokenizer, "tok", None)  # a Hugging Face tokenizer.json decides BOS itself
        self._hf = inner is not None and hasattr(inner, "post_processor")
        self.add_bos_token = _flag(add_bos_token)

    # ---- what TemplateLM needs

    @property
    def eot_token_id(self) -> int:
        return self.mm_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.mm_tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.mm_tokenizer, "id", type(self.mm_tokenizer).__name__))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if self._hf:  # None: what its post-processor adds (what transformers gives the same model)
            return self.mm_tokenizer.tok.encode(string, add_special_tokens=special is not False).ids
        ids = self.mm_tokenizer.encode(string)
        return ids if special is False else [self.mm_tokenizer.bos_id, *ids]  # documents start with BOS

    def tok_decode(self, tokens) -> str:
        return self.mm_tokenizer.decode(tokens if isinstance(tokens, list) else [tokens])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        sequences = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("lm-eval asked for the log-likelihood of an empty continuation")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]  # as the hf backend cuts it
            sequences.append((whole, len(whole) - len(continuation)))
        results = [(s.logprob, s.is_greedy) for s in self.scorer.score(sequences)]
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's disjoint rolling windows (each token scored once), all documents' windows packed
        together; the sum per document."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Every request through the engine's continuous batch at once; each cut at its `until` strings."""
        if self.generator is None:
            raise ValueError("generate_until needs the generation engine (load the backend with pretrained=DIR)")
        from maxmodel.inference.sampling import SamplingOptions
        eos = self.tok_decode(self.eot_token_id)
        prompts, options, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            new = int(kwargs.pop("max_gen_toks"))
            if new >= self.generator.max_len:
                raise ValueError(f"max_gen_toks={new} leaves no room for a prompt in max_len {self.generator.max_len}")
            ids = self.tok_encode(context)[-(min(self.max_length, self.generator.max_len) - new):]
            sampled = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 1.0)) > 0
            options.append(SamplingOptions(
                max_new_tokens=new, temperature=float(kwargs.get("temperature", 1.0)) if sampled else 0.0,
                top_p=float(kwargs.get("top_p", 1.0) or 1.0), top_k=int(kwargs.get("top_k", 0) or 0),
                seed=int(kwargs.get("seed", 1234)), stop=[u for u in until if u]).validate(self.generator.vocab_size))
            prompts.append(ids)
            stops.append(until)
        outputs = self.generator.generate(prompts, options)
        texts = []
        for req, out, until in zip(requests, outputs, stops):
            text = out.completions[0].text
            for term in until:
                if term:
                    text = text.split(term)[0]
            texts.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts
