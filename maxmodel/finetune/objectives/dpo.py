"""Direct preference optimisation (Rafailov et al. 2023): the sigmoid loss on the policy's log-ratio margin
against a frozen reference, with label smoothing (conservative DPO). See finetune/preference.py."""
from ..preference import pair_objective

OBJECTIVE = pair_objective("dpo", __doc__)
