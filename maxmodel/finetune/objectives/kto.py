"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024): unpaired desirable / undesirable responses (a pair
is one of each), each against the reference point z0, the batch's KL estimate. See finetune/preference.py."""
from ..preference import METRICS, PREFERENCE_KEYS, kto_loss, reference_preparer
from .base import Objective

OBJECTIVE = Objective("kto", kto_loss, formats=("preference",), extra_keys=PREFERENCE_KEYS + ("ref_logps",),
                      doc=__doc__, metrics=METRICS + ("kl",), prepare=reference_preparer)
