"""Generalized advantage estimation (Schulman et al. 2016) over each completion's tokens, on the host (rows
of at most rl.max_new_tokens steps: a few microseconds each), for PPO."""
from __future__ import annotations

import numpy as np


def token_rewards(mask: np.ndarray, kl: np.ndarray, scores: np.ndarray, beta: float) -> np.ndarray:
    """RLHF's per-token reward [B, L]: -beta · KL(π || π_ref) estimate at every completion token, and the
    sequence's score (reward model / functions) added at its last token."""
    r = np.where(mask > 0, -beta * kl, 0.0)
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)
    r[np.arange(len(r)), last] += scores
    return r


def gae(mask: np.ndarray, rewards: np.ndarray, values: np.ndarray, gamma: float, lam: float):
    """(advantages, returns) [B, L] on the completion positions (mask > 0, contiguous per row); the value
    after a completion's last token is 0 (the episode ends there)."""
    adv = np.zeros_like(rewards, dtype=np.float64)
    for i in range(mask.shape[0]):
        idx = np.flatnonzero(mask[i] > 0)
        running, next_value = 0.0, 0.0
        for t in idx[::-1]:
            delta = rewards[i, t] + gamma * next_value - values[i, t]
            running = delta + gamma * lam * running
            adv[i, t] = running
            next_value = values[i, t]
    returns = adv + np.where(mask > 0, values, 0.0)
    return adv, returns


def whiten(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the completion tokens of the batch (0 elsewhere)."""
    sel = x[mask > 0]
    if sel.size < 2:
        return np.where(mask > 0, x - sel.mean() if sel.size else x, 0.0)
    return np.where(mask > 0, (x - sel.mean()) / (sel.std() + 1e-8), 0.0)
