"""SimPO (Meng et al. 2024): the length-normalised log-likelihood as the implicit reward, a target margin
dpo.simpo_gamma, no reference model."""
from ..preference import pair_objective

OBJECTIVE = pair_objective("simpo", __doc__)
