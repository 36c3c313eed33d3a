"""Odds-ratio preference optimisation (Hong et al. 2024): the chosen response's NLL plus dpo.orpo_lambda times
the log-sigmoid odds-ratio term; no reference model, so SFT and preference tuning are one stage."""
from ..preference import pair_objective

OBJECTIVE = pair_objective("orpo", __doc__)
