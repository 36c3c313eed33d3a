"""Prompt construction for the native tasks: zero-shot, few-shot (k examples drawn with a seed) and
chain-of-thought.

A prompt is the few-shot examples, each rendered `template` + `target` (the example's answer; with
chain of thought, its worked `rationale` then the answer), joined by `separator`, then the document's own
`template`. Templates are Python format strings over the record's fields (`{question}`, `{prompt}`, ...).
The examples of document i are drawn from the pool (a separate few-shot file, or the task's other
documents) with `random.Random(f"{seed}:{i}")`: the same seed gives the same prompts whatever the order or
subset of documents evaluated, a different seed other examples.
"""
from __future__ import annotations

import dataclasses
import random

from maxmodel.config.errors import ConfigError

COT_TRIGGER = "Let's think step by step."


@dataclasses.dataclass
class PromptSpec:
    template: str                       # the document's part, e.g. "Question: {question}\nAnswer:"
    target: str                         # an example's answer, e.g. " {answer_text}"
    num_fewshot: int = 0
    seed: int = 1234
    separator: str = "\n\n"
    cot: bool = False                   # chain of thought: examples show `rationale`; zero-shot adds the trigger
    cot_target: str = " {rationale} The answer is {answer_text}."
    cot_trigger: str = COT_TRIGGER


def render(template: str, record: dict, where: str) -> str:
    try:
        return template.format_map(record)
    except KeyError as e:
        raise ConfigError("task", f"{where}: the template needs field {e.args[0]!r}, which the record lacks "
                                  f"(it has {', '.join(sorted(record))})") from None


def fewshot_examples(pool: list[dict], k: int, seed: int, index: int, exclude: dict | None = None) -> list[dict]:
    """k examples from `pool` for document `index` (never `exclude`, the document itself)."""
    if k <= 0:
        return []
    candidates = [r for r in pool if r is not exclude]
    if len(candidates) < k:
        raise ConfigError("num_fewshot", f"{k} few-shot examples asked for, the pool holds {len(candidates)}")
    return random.Random(f"{seed}:{index}").sample(candidates, k)


def build_prompt(spec: PromptSpec, record: dict, shots: list[dict], where: str = "record") -> str:
    target = spec.cot_target if spec.cot else spec.target
    parts = [render(spec.template, s, s.get("_where", where)) + render(target, s, s.get("_where", where))
             for s in shots]
    own = render(spec.template, record, where)
    if spec.cot and not shots:  # zero-shot chain of thought (Kojima et al. 2022)
        own = f"{own} {spec.cot_trigger}"
    return spec.separator.join([*parts, own])
