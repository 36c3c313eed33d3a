"""Autoraters: meta-evaluation (kappa, Spearman, agreement) equals scikit-learn / scipy on a synthetic judged
set with known labels; pairwise judging in both orders measures a judge's position bias; rubric
decomposition aggregates per-criterion scores; unparsable judge outputs are counted skips or an error naming
the item. The judges here are scripted (what they answer is known); tests/test_eval_cli.py runs a model."""
from __future__ import annotations

import re

import numpy as np
import pytest

from maxmodel.eval import autorater
from maxmodel.eval.meta_eval import cohen_kappa, meta_evaluate, spearman


class ScriptedJudge:
    """A judge in generate mode whose answer is `answer(prompt)`."""
    mode = "generate"

    def __init__(self, answer):
        self.answer, self.prompts = answer, []

    def complete(self, prompts):
        self.prompts += prompts
        return [self.answer(p) for p in prompts]


def _field(prompt: str, name: str) -> str:
    return re.search(rf"{name}: (.*)", prompt).group(1)


def test_meta_evaluation_equals_sklearn_and_scipy():
    from scipy.stats import spearmanr
    from sklearn.metrics import cohen_kappa_score
    rng = np.random.default_rng(0)
    human = rng.integers(1, 6, size=200)
    noise = rng.choice([-1, 0, 0, 0, 1], size=200)
    judge = np.clip(human + noise, 1, 5)
    for weights in (None, "linear", "quadratic"):
        assert cohen_kappa(judge.tolist(), human.tolist(), weights) == pytest.approx(
            cohen_kappa_score(judge, human, weights=weights), abs=1e-12)
    assert spearman(judge, human) == pytest.approx(spearmanr(judge, human).statistic, abs=1e-12)
    verdicts_h = rng.choice(["A", "B", "tie"], size=100).tolist()
    verdicts_j = [v if rng.random() < 0.7 else "A" for v in verdicts_h]  # a judge leaning to A
    assert cohen_kappa(verdicts_j, verdicts_h) == pytest.approx(cohen_kappa_score(verdicts_j, verdicts_h), abs=1e-12)
    labels = judge.tolist()
    labels[:10] = [None] * 10  # skipped by the judge
    out = meta_evaluate(labels, human.tolist())
    assert out["n"] == 190 and out["skipped"] == 10
    assert out["agreement"] == pytest.approx(float(np.mean(judge[10:] == human[10:])))
    assert out["kappa"] == pytest.approx(cohen_kappa_score(judge[10:], human[10:]))
    assert out["spearman"] == pytest.approx(spearmanr(judge[10:], human[10:]).statistic)
    assert 0.3 < out["kappa"] < 0.9  # neither trivial nor perfect


def test_pairwise_in_both_orders_measures_position_bias():
    items = [{"question": f"q{i}", "response_a": f"good{i}" if i % 2 else f"bad{i}",
              "response_b": f"bad{i}" if i % 2 else f"good{i}"} for i in range(20)]
    fair = autorater.pairwise(ScriptedJudge(lambda p: "A" if "good" in _field(p, "Response A") else "B"), items)
    assert fair["consistency"] == 1.0 and fair["first_position_rate"] == 0.5
    assert fair["verdicts"] == ["A" if i % 2 else "B" for i in range(20)] and fair["win_rate_a"] == 0.5

    # on the first 8 items this judge picks whatever it sees first: both orders disagree there
    def biased(p):
        i = int(_field(p, "Question")[1:])
        return "A" if i < 8 else ("A" if "good" in _field(p, "Response A") else "B")
    judge = ScriptedJudge(biased)
    out = autorater.pairwise(judge, items)
    assert len(judge.prompts) == 40  # every item asked twice, the second time with A and B swapped
    assert "Response A: bad0" in judge.prompts[0] and "Response A: good0" in judge.prompts[20]
    assert out["consistency"] == pytest.approx(12 / 20)
    assert out["first_position_rate"] == pytest.approx((16 + 12) / 40)  # 8 x 2 biased A's + 12 fair A's of 40
    assert out["verdicts"][:8] == ["tie"] * 8 and out["verdicts"][8:] == fair["verdicts"][8:]
    assert out["second_order"][:8] == ["B"] * 8  # "A" in the swapped order maps back to B


def test_pointwise_rubric_decomposition_and_unparsable_outputs():
    criteria = [autorater.Criterion("accuracy", "facts are right", 3.0), autorater.Criterion("style", "reads well", 1.0)]
    items = [{"question": "q", "response": r} for r in ("r1", "r2", "r3")]

    def answer(p):
        crit, resp = _field(p, "Rubric").split(":")[0], _field(p, "Response")
        return {"accuracy": {"r1": "5", "r2": "2", "r3": "no idea"}, "style": {"r1": "1", "r2": "4", "r3": "Score 9"}}[
            crit][resp]
    out = autorater.pointwise(ScriptedJudge(answer), items, criteria)
    assert out["criteria"] == {"accuracy": [5.0, 2.0, None], "style": [1.0, 4.0, None]}
    assert out["scores"] == [pytest.approx((5 * 3 + 1) / 4), pytest.approx((2 * 3 + 4) / 4), None]
    assert out["skipped"] == 2 and out["judged"] == 2  # "no idea"; 9 is outside 1..5
    with pytest.raises(autorater.JudgeOutputError, match="item 2: the judge's answer 'no idea'"):
        autorater.pointwise(ScriptedJudge(answer), items, criteria, on_bad="error")
    bad = autorater.pairwise(ScriptedJudge(lambda p: "Both are fine"),
                             [{"question": "q", "response_a": "x", "response_b": "y"}])
    assert bad["skipped"] == 2 and bad["judged"] == 0 and bad["verdicts"] == [None]
    assert autorater.parse_verdict(" b) because") == "B" and autorater.parse_verdict("Tie.") == "tie"
    assert autorater.parse_score("Score: 4/5", 1, 5) == 4 and autorater.parse_score("7", 1, 5) is None
