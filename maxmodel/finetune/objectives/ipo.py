"""Identity preference optimisation (Azar et al. 2023): the squared distance of the length-normalised
log-ratio margin from 1/(2 beta); it cannot overfit a deterministic preference the way DPO's sigmoid does."""
from ..preference import pair_objective

OBJECTIVE = pair_objective("ipo", __doc__)
