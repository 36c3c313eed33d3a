"""LLM-as-judge ("autorater") with any maxmodel model: pointwise (rubric -> score), pairwise (A vs B, asked
in both orders to measure position bias) and rubric decomposition (each sub-criterion judged alone, then a
weighted mean).

A judge answers prompts in one of two modes:
- `generate`: greedy text, parsed (a score in the scale / a verdict A, B or tie); an output that does not
  parse is a counted skip (`on_bad: skip`) or an error naming the item and the text (`on_bad: error`);
- `score`: the log-likelihood of each allowed answer (" 1" ... " 5", " A" / " B" / " tie"), the most likely
  one taken (and, pointwise, the probability-weighted expected score, as G-Eval does): never unparsable.
Templates are Python format strings over the item's fields plus `rubric`, `low`, `high`.
"""
from __future__ import annotations

import dataclasses
import math
import re

POINTWISE = ("You are grading a response against a rubric.\nRubric: {rubric}\nQuestion: {question}\n"
             "Response: {response}\nGive an integer score from {low} to {high}.\nScore:")
PAIRWISE = ("You are comparing two responses to the same question.\nQuestion: {question}\n"
            "Response A: {response_a}\nResponse B: {response_b}\nWhich response is better? Answer A, B or tie.\n"
            "Verdict:")
VERDICTS = ("A", "B", "tie")


class JudgeOutputError(ValueError):
    """A judge's answer that does not parse (with on_bad=error)."""


@dataclasses.dataclass
class Criterion:
    name: str
    description: str
    weight: float = 1.0


class Judge:
    """A maxmodel model (eval.model.EvalModel) answering judge prompts; `mode` generate | score."""

    def __init__(self, model, mode: str = "generate", max_gen_toks: int = 16):
        if mode not in ("generate", "score"):
            raise ValueError(f"judge mode must be generate or score, not {mode!r}")
        self.model, self.mode, self.max_gen_toks = model, mode, max_gen_toks

    def complete(self, prompts: list[str]) -> list[str]:
        from maxmodel.inference.sampling import SamplingOptions
        options = [SamplingOptions(max_new_tokens=self.max_gen_toks, temperature=0.0, stop=["\n"])] * len(prompts)
        return self.model.generate([self.model.encode(p) for p in prompts], options)

    def choose(self, prompts: list[str], answers: list[str]) -> list[list[float]]:
        """Per prompt, the probability of each answer (softmax over the answers' log-likelihoods)."""
        scores = self.model.loglikelihoods([(p, " " + a) for p in prompts for a in answers])
        out = []
        for i in range(len(prompts)):
            lls = [s.logprob for s in scores[i * len(answers):(i + 1) * len(answers)]]
            top = max(lls)
            z = sum(math.exp(x - top) for x in lls)
            out.append([math.exp(x - top) / z for x in lls])
        return out


def parse_score(text: str, low: int, high: int) -> int | None:
    """The first integer of the answer if it lies in [low, high]."""
    m = re.search(r"-?\d+", text)
    value = int(m.group()) if m else None
    return value if value is not None and low <= value <= high else None


def parse_verdict(text: str) -> str | None:
    m = re.match(r"\W*(tie|a|b)\b", text.strip(), re.IGNORECASE)
    return None if m is None else {"a": "A", "b": "B", "tie": "tie"}[m.group(1).lower()]


class _Skips:
    def __init__(self, on_bad: str):
        if on_bad not in ("skip", "error"):
            raise ValueError(f"on_bad must be skip or error, not {on_bad!r}")
        self.on_bad, self.count, self.examples = on_bad, 0, []

    def __call__(self, index: int, text: str, what: str) -> None:
        if self.on_bad == "error":
            raise JudgeOutputError(f"item {index}: the judge's answer {text!r} is not {what}")
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append({"item": index, "output": text})


def _ask_scores(judge, prompts: list[str], low: int, high: int, skips: _Skips) -> tuple[list, list]:
    """(score or None, expected score or None) per prompt."""
    if judge.mode == "score":
        answers = [str(v) for v in range(low, high + 1)]
        probs = judge.choose(prompts, answers)
        return ([low + max(range(len(p)), key=p.__getitem__) for p in probs],
                [sum(p_i * (low + i) for i, p_i in enumerate(p)) for p in probs])
    scores = []
    for i, text in enumerate(judge.complete(prompts)):
        value = parse_score(text, low, high)
        if value is None:
            skips(i, text, f"a score from {low} to {high}")
        scores.append(value)
    return scores, [None if s is None else float(s) for s in scores]


def pointwise(judge, items: list[dict], rubric: str | list[Criterion], template: str = POINTWISE,
              scale: tuple[int, int] = (1, 5), on_bad: str = "skip") -> dict:
    """Score each item ({question, response, ...}). With a list of Criteria (rubric decomposition) each is
    judged alone and the item's score is their weighted mean (over the criteria that parsed)."""
    low, high = scale
    skips = _Skips(on_bad)
    criteria = rubric if isinstance(rubric, list) else [Criterion("overall", rubric)]
    per_criterion = {}
    for c in criteria:
        prompts = [template.format_map({**item, "rubric": f"{c.name}: {c.description}", "low": low, "high": high})
                   for item in items]
        per_criterion[c.name] = _ask_scores(judge, prompts, low, high, skips)[1]
    scores = []
    for i in range(len(items)):
        parts = [(per_criterion[c.name][i], c.weight) for c in criteria if per_criterion[c.name][i] is not None]
        scores.append(sum(v * w for v, w in parts) / sum(w for _, w in parts) if parts else None)
    valid = [s for s in scores if s is not None]
    return {"scores": scores, "criteria": per_criterion if len(criteria) > 1 else {},
            "mean": sum(valid) / len(valid) if valid else float("nan"), "judged": len(valid),
            "skipped": skips.count, "skip_examples": skips.examples}


def _ask_verdicts(judge, prompts: list[str], skips: _Skips, offset: int) -> list[str | None]:
    if judge.mode == "score":
        return [VERDICTS[max(range(3), key=p.__getitem__)] for p in judge.choose(prompts, list(VERDICTS))]
    out = []
    for i, text in enumerate(judge.complete(prompts)):
        verdict = parse_verdict(text)
        if verdict is None:
            skips(offset + i, text, "a verdict A, B or tie")
        out.append(verdict)
    return out


def pairwise(judge, items: list[dict], template: str = PAIRWISE, on_bad: str = "skip") -> dict:
    """Judge each item ({question, response_a, response_b}) twice: as given and with the responses swapped.
    The second answer is mapped back (B in the swapped order = A). Reports the verdicts in both orders,
    `consistency` (fraction of items whose two verdicts agree), `first_position_rate` (how often a decisive
    verdict picks whichever response was shown first: 0.5 = no position bias) and the final verdicts
    (agreeing orders; a tie where they disagree)."""
    skips = _Skips(on_bad)
    given = [template.format_map(item) for item in items]
    swapped = [template.format_map({**item, "response_a": item["response_b"], "response_b": item["response_a"]})
               for item in items]
    first = _ask_verdicts(judge, given, skips, 0)
    back = {"A": "B", "B": "A", "tie": "tie", None: None}
    second_raw = _ask_verdicts(judge, swapped, skips, len(items))
    second = [back[v] for v in second_raw]
    both = [(a, b) for a, b in zip(first, second) if a is not None and b is not None]
    decisive = [v for v in first + second_raw if v in ("A", "B")]
    final = [None if a is None or b is None else a if a == b else "tie" for a, b in zip(first, second)]
    wins = [v for v in final if v is not None]
    return {"first_order": first, "second_order": second, "verdicts": final,
            "consistency": sum(a == b for a, b in both) / len(both) if both else float("nan"),
            "first_position_rate": sum(v == "A" for v in decisive) / len(decisive) if decisive else float("nan"),
            "win_rate_a": sum(v == "A" for v in wins) / len(wins) if wins else float("nan"),
            "judged": len(both), "skipped": skips.count, "skip_examples": skips.examples}
