"""Next-token prediction on every counted token (pretraining)."""
from .base import Objective, lm_loss

OBJECTIVE = Objective("causal_lm", lm_loss, archs=("decoder",))
