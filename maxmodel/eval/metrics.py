"""Completion metrics: exact match and token F1 as the official SQuAD v1.1 script defines them (normalised:
lower case, no punctuation, no articles, single spaces), BLEU from sacrebleu, ROUGE from rouge-score, and
any function given by import path (`package.module:function`). Each reference list may hold several
answers: a prediction scores its best match (SQuAD's rule); BLEU takes them all as references.

A metric is `fn(predictions: list[str], references: list[list[str]]) -> float | dict[str, float]`.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable

from maxmodel.config.errors import ConfigError

_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(predictions: list[str], references: list[list[str]]) -> float:
    return _mean([max(float(normalize_answer(p) == normalize_answer(r)) for r in refs)
                  for p, refs in zip(predictions, references)])


def f1(predictions: list[str], references: list[list[str]]) -> float:
    return _mean([max(_f1(p, r) for r in refs) for p, refs in zip(predictions, references)])


def bleu(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenisation, 0..100); items with fewer references get their
    last one repeated (sacrebleu wants the same number per item)."""
    import sacrebleu
    n = max(len(r) for r in references)
    streams = [[refs[min(i, len(refs) - 1)] for refs in references] for i in range(n)]
    return float(sacrebleu.corpus_bleu(predictions, streams).score)


def rouge(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (rouge-score, Porter stemming), each prediction against its best reference."""
    from rouge_score import rouge_scorer
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    per_item = [scorer.score_multi(refs, p) for p, refs in zip(predictions, references)]
    return {k: _mean([s[k].fmeasure for s in per_item]) for k in kinds}


BUILTIN: dict[str, Callable] = {"exact_match": exact_match, "em": exact_match, "f1": f1, "bleu": bleu,
                                "rouge": rouge}


def resolve(name: str, key: str = "metrics") -> Callable:
    """A built-in metric, or `package.module:function` imported (an error names what is missing)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ConfigError(key, f"unknown metric '{name}': use one of {', '.join(sorted(BUILTIN))} or "
                               f"package.module:function")
    from maxmodel.imports import import_callable
    return import_callable(name, key, "metric")


def compute(names: list[str], predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        value = resolve(name)(predictions, references)
        if isinstance(value, dict):
            out.update({k: float(v) for k, v in value.items()})
        else:
            out[name.rsplit(":", 1)[-1] if ":" in name else name] = float(value)
    return out


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")
