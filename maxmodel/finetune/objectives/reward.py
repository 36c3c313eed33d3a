"""Reward model: the transformer with a scalar head (models/score_head.py), trained with Bradley-Terry on pairs,
Plackett-Luce on ranked lists and squared error on scored responses. Its score of a document is read at the
document's last position; `maxmodel.finetune.reward_scorer` scores completions for best-of-N."""
from ..preference import PREFERENCE_KEYS, reward_loss
from .base import Objective

OBJECTIVE = Objective("reward", reward_loss, formats=("preference",), extra_keys=PREFERENCE_KEYS, doc=__doc__,
                      metrics=("reward_accuracy", "reward_margin", "score_error"))
