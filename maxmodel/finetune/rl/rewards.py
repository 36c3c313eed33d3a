"""Reward functions: `fn(prompts, completions, **columns) -> list[float]`, imported by dotted path
(`package.module.function` or `package.module:function`), several with weights (rl.rewards). `prompts` and
`completions` are aligned lists (a prompt repeated for each of its completions); every other field of the
prompt records comes as a keyword argument, a list aligned the same way (TRL's convention).

A function that raises, returns the wrong number of values or a non-finite one is an error naming it; with
data.on_bad_record=skip its values for that batch become NaN instead, and the completions with a NaN reward
are left out of the update (their group's advantages are zero) and counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from maxmodel.config.errors import ConfigError
from maxmodel.imports import import_callable


class RewardError(ValueError):
    """A reward function misbehaved; the message names it (the CLI exits 1, checkpoints kept)."""


@dataclass
class RewardFunction:
    name: str          # the dotted path, as configured
    fn: Callable
    weight: float


def load_rewards(specs: list) -> list[RewardFunction]:
    """rl.rewards entries: a dotted path, or {fn: path, weight: w}."""
    out = []
    for i, spec in enumerate(specs):
        key = f"rl.rewards[{i}]"
        if isinstance(spec, str):
            spec = {"fn": spec}
        if not isinstance(spec, dict) or "fn" not in spec or set(spec) - {"fn", "weight"}:
            raise ConfigError(key, f"expected a dotted path or {{fn: path, weight: number}}, got {spec!r}")
        weight = spec.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"{key}.weight", f"must be a finite number, got {weight!r}")
        out.append(RewardFunction(str(spec["fn"]), import_callable(str(spec["fn"]), f"{key}.fn", "reward function"), float(weight)))
    return out


def _call(f: RewardFunction, prompts, completions, columns) -> np.ndarray:
    """The function's values [n], or RewardError naming it (with the values, NaN where not finite, when
    only some are bad)."""
    n = len(completions)
    try:
        values = f.fn(prompts=prompts, completions=completions, **columns)
    except Exception as e:  # noqa: BLE001 - a user function may raise anything: name it
        raise RewardError(f"reward function {f.name} raised {type(e).__name__}: {e}") from e
    try:
        values = np.asarray(values, np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise RewardError(f"reward function {f.name} returned {type(values).__name__}, not numbers") from None
    if values.shape != (n,):
        raise RewardError(f"reward function {f.name} returned {values.size} values for {n} completions")
    if not np.isfinite(values).all():
        i = int(np.flatnonzero(~np.isfinite(values))[0])
        error = RewardError(f"reward function {f.name} returned {values[i]} for completion {i} "
                            f"({completions[i]!r})")
        error.values = np.where(np.isfinite(values), values, np.nan)
        raise error
    return values


def score(functions: list[RewardFunction], prompts: list, completions: list[str], columns: dict[str, list],
          skip_bad: bool) -> tuple[dict[str, np.ndarray], int]:
    """(each function's rewards [n], float64, NaN where a skipped failure left none; failures skipped)."""
    out, failures = {}, 0
    for f in functions:
        try:
            out[f.name] = _call(f, prompts, completions, columns)
        except RewardError as e:
            if not skip_bad:
                raise
            failures += 1
            out[f.name] = getattr(e, "values", np.full(len(completions), np.nan))
    return out, failures


def combine(functions: list[RewardFunction], per_function: dict[str, np.ndarray], extra: Any = None) -> np.ndarray:
    """The weighted sum [n] (NaN where any term is NaN); `extra`: rewards from a reward model, weight 1."""
    total = sum(f.weight * per_function[f.name] for f in functions) if functions else 0.0
    return np.asarray(total + (0.0 if extra is None else extra), np.float64)


def group_advantages(rewards: np.ndarray, group_size: int, scale: bool) -> tuple[np.ndarray, dict]:
    """GRPO's advantages [n]: each reward minus its group's mean, divided by the group's std (ddof 1, as TRL)
    when `scale`. A group with a NaN reward or with no spread gets zero advantages (no signal to learn from)."""
    r = rewards.reshape(-1, group_size)
    bad = np.isnan(r).any(axis=1)
    r = np.where(bad[:, None], 0.0, r)
    centred = r - r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, ddof=1, keepdims=True) if group_size > 1 else np.ones_like(r[:, :1])
    flat = np.isclose(std[:, 0], 0.0) | bad
    adv = centred / (std + 1e-4) if scale else centred
    adv = np.where(flat[:, None], 0.0, adv)
    return adv.reshape(-1), {"zero_spread_groups": float(np.mean(flat & ~bad)),
                             "skipped_groups": float(np.mean(bad))}


def reward_model_scorer(path: str, key: str):
    """`fn(prompts, completions) -> [n] scores` of a trained reward model directory (finetune/reward_scorer.py),
    reading each (prompt, completion) as its training read them. String prompts only: a reward model was
    trained on the text its preference records held."""
    from maxmodel.finetune.reward_scorer import RewardScorer
    scorer = RewardScorer(path)

    def score_texts(prompts, completions):
        if not all(isinstance(p, str) for p in prompts):
            raise ConfigError(key, "the reward model scores string prompts; these records hold chat messages")
        return np.asarray(scorer.score_texts(list(prompts), list(completions)), np.float64)
    return score_texts
