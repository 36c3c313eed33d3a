"""BERT's masked LM. The corruption happens on the host (data/objectives.py: inputs masked, targets the
originals, loss_mask on the selected positions), so the loss is the plain token cross-entropy."""
from .base import Objective, lm_loss

OBJECTIVE = Objective("masked_lm", lm_loss, archs=("encoder",))
