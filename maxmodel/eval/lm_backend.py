"""lm-evaluation-harness backend `maxmodel`: lm-eval's TemplateLM over the packed scorer (loglikelihood,
loglikelihood_rolling) and the generation engine (generate_until).

    lm_eval.simple_evaluate(model="maxmodel", model_args="pretrained=RUN_OR_MODEL_DIR,max_length=512", ...)

or, in process, `MaxModelLM(model=EvalModel(...))` (evaluation during training, `maxmodel eval`). Requests are
cut as lm-eval's own `hf` backend cuts them (left truncation to max_length + 1 tokens, its rolling windows),
so the numbers compare one to one.
"""
from __future__ import annotations

import logging

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from .model import EvalModel

log = logging.getLogger("maxmodel.eval")


@register_model("maxmodel")
class MaxModelLM(TemplateLM):
    """`pretrained`: a run directory or model directory. `max_length`: the longest sequence in tokens
    (default: the model's max_seq_len); `batch_rows` / `row_len`: rows per forward pass and the shortest row;
    `max_batch`: decode slots for generate_until; `overrides`: config key=value, `;`-separated."""

    def __init__(self, pretrained: str | None = None, max_length: int = 0, batch_rows: int = 16, row_len: int = 256,
                 max_batch: int = 16, max_gen_toks: int = 256, overrides: str = "", model: EvalModel | None = None,
                 **unused):
        super().__init__()
        if unused:
            log.info("maxmodel backend: ignoring lm-eval arguments %s", sorted(unused))
        if model is None:
            if pretrained is None:
                raise ValueError("the maxmodel backend needs pretrained=DIR (a run or model directory)")
            model = EvalModel.load(pretrained, [o for o in str(overrides).split(";") if o], int(max_length),
                                   int(batch_rows), int(row_len), int(max_batch))
        self.model, self.mm_tokenizer = model, model.tokenizer
        self.max_gen_toks = int(max_gen_toks)

    # ---- what TemplateLM needs

    @property
    def eot_token_id(self) -> int:
        return self.mm_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.mm_tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self.model.max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.mm_tokenizer, "id", type(self.mm_tokenizer).__name__))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.model.encode(string, bos=add_special_tokens is not False)

    def tok_decode(self, tokens) -> str:
        return self.mm_tokenizer.decode(tokens if isinstance(tokens, list) else [tokens])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scores = self.model.score_pairs([(context, continuation) for _, context, continuation in requests])
        results = [(s.logprob, s.is_greedy) for s in scores]
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's disjoint rolling windows (each token scored once), every document's windows packed
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
        """Every request through the engine's continuous batch at once; `until` strings stop and cut it,
        `max_gen_toks` bounds it, do_sample / temperature / top_p / top_k / seed sample it."""
        from maxmodel.inference.sampling import SamplingOptions
        eos = self.tok_decode(self.eot_token_id)
        prompts, options, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            options.append(SamplingOptions(
                max_new_tokens=int(kwargs.pop("max_gen_toks")), temperature=temperature,
                top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0),
                seed=int(kwargs.get("seed", 1234)), stop=[u for u in until if u]))
            prompts.append(self.tok_encode(context))
            stops.append(until)
        texts = []
        for req, text, until in zip(requests, self.model.generate(prompts, options), stops):
            for term in until:  # the engine stops at them; cut as the hf backend does, in case
                if term:
                    text = text.split(term)[0]
            texts.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts
