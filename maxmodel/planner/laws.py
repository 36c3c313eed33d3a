"""Published scaling laws: compute-optimal model size N and training tokens D for a FLOP budget C = 6ND.

Every law answers `optimal(C) -> (N, D)` and `budget_for_params(N) -> C` (the budget at which N is optimal);
laws with a loss surface also answer `loss(N, D)`. `param_kind` says whether N counts all parameters
(Chinchilla) or only non-embedding ones (Kaplan).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from maxmodel.config.errors import ConfigError

PF_DAY = 1e15 * 86400  # FLOPs in a petaflop/s-day (Kaplan et al. measure compute in PF-days)


@dataclass(frozen=True)
class ParametricLaw:
    """L(N, D) = E + A/N^alpha + B/D^beta, minimised under C = 6ND in closed form (Hoffmann et al. 2022, eq. 4):
    N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b, G = (alpha A / (beta B))^(1/(alpha+beta)),
    a = beta/(alpha+beta), b = alpha/(alpha+beta)."""
    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str
    param_kind: str = "total"

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def optimal(self, flops: float) -> tuple[float, float]:
        return self.G * (flops / 6) ** self.a, (flops / 6) ** self.b / self.G

    def budget_for_params(self, params: float) -> float:
        return 6 * (params / self.G) ** (1 / self.a)

    def loss(self, params: float, tokens: float) -> float:
        return self.E + self.A / params ** self.alpha + self.B / tokens ** self.beta


@dataclass(frozen=True)
class PowerLaw:
    """N_opt = k C^a and D_opt = C / (6 N_opt) (so D_opt ∝ C^(1-a)); k is calibrated by least squares in log
    space through the paper's own (N, C) anchor rows, so the law reproduces the published table."""
    name: str
    a: float
    anchors: tuple[tuple[float, float], ...]   # (params, flops) rows of the paper's table
    source: str
    param_kind: str = "total"
    k: float = field(init=False)

    def __post_init__(self):
        logk = sum(math.log(n) - self.a * math.log(c) for n, c in self.anchors) / len(self.anchors)
        object.__setattr__(self, "k", math.exp(logk))

    def optimal(self, flops: float) -> tuple[float, float]:
        n = self.k * flops ** self.a
        return n, flops / (6 * n)

    def budget_for_params(self, params: float) -> float:
        return (params / self.k) ** (1 / self.a)

    loss = None


@dataclass(frozen=True)
class KaplanLaw:
    """Kaplan et al. 2020, "Scaling Laws for Neural Language Models".

    Loss (eq. 1.5, Table 2 fit): L(N, D) = [(Nc/N)^(alphaN/alphaD) + Dc/D]^alphaD with alphaN = 0.076,
    alphaD = 0.103, Nc = 6.4e13, Dc = 1.8e13; N counts non-embedding parameters, L is in nats on WebText2.
    Allocation (Table 6 / Figure 14): N_opt = 1.3e9 · (C / PF-day)^0.73, here with D = C / (6N).
    Kept for comparison: Hoffmann et al. 2022 showed this allocation over-sizes models.
    """
    name: str = "kaplan"
    alpha_n: float = 0.076
    alpha_d: float = 0.103
    n_c: float = 6.4e13
    d_c: float = 1.8e13
    n_coef: float = 1.3e9
    a: float = 0.73
    source: str = "Kaplan et al. 2020, eq. 1.5 + Table 2 (loss); Table 6 / Fig. 14 (N_opt ∝ C^0.73)"
    param_kind: str = "non_embedding"

    def optimal(self, flops: float) -> tuple[float, float]:
        n = self.n_coef * (flops / PF_DAY) ** self.a
        return n, flops / (6 * n)

    def budget_for_params(self, params: float) -> float:
        return PF_DAY * (params / self.n_coef) ** (1 / self.a)

    def loss(self, params: float, tokens: float) -> float:
        return ((self.n_c / params) ** (self.alpha_n / self.alpha_d) + self.d_c / tokens) ** self.alpha_d


# Hoffmann et al. 2022, Table 3 (Approach 1) and Table A3 (Approach 2): (parameters, FLOPs).
TABLE3_APPROACH1 = ((400e6, 1.92e19), (1e9, 1.21e20), (10e9, 1.23e22), (67e9, 5.76e23), (175e9, 3.85e24),
                    (280e9, 9.90e24), (520e9, 3.43e25), (1e12, 1.27e26), (10e12, 1.30e28))
TABLEA3_APPROACH2 = ((400e6, 1.84e19), (1e9, 1.20e20), (10e9, 1.32e22), (67e9, 6.88e23), (175e9, 4.54e24),
                     (280e9, 1.18e25), (520e9, 4.19e25), (1e12, 1.59e26), (10e12, 1.75e28))

LAWS = {
    "chinchilla-1": PowerLaw(
        "chinchilla-1", 0.50, TABLE3_APPROACH1,
        "Hoffmann et al. 2022, Approach 1 (training-curve envelope): Table 2 a=0.50, b=0.50; "
        "calibrated through Table 3"),
    "chinchilla-2": PowerLaw(
        "chinchilla-2", 0.49, TABLEA3_APPROACH2,
        "Hoffmann et al. 2022, Approach 2 (IsoFLOP profiles): Table 2 a=0.49, b=0.51; "
        "calibrated through Table A3"),
    "chinchilla-3": ParametricLaw(
        "chinchilla-3", E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28,
        source="Hoffmann et al. 2022, Approach 3 (parametric fit), eq. 10 with the printed constants"),
    "epoch": ParametricLaw(
        # Besiroglu et al. 2024 print E = 1.8172 (SE 0.03); E does not move the optimal allocation.
        "epoch", E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
        source="Besiroglu, Erdil, Barnett, You 2024, 'Chinchilla Scaling: A replication attempt' (refit of "
               "Approach 3 on data read off Hoffmann et al.'s Figure 4)"),
    "kaplan": KaplanLaw(),
    # The base surface of the data-constrained law, fitted jointly with its decay constants (repeat.py) on the
    # paper's C4 runs; the released unrounded values (github.com/huggingface/datablations, "Parametric Fit"):
    # A = e^6.255414, B = e^7.3049974, E = e^0.6254804, alpha = beta = 0.3526596.
    "muennighoff": ParametricLaw(
        "muennighoff", E=math.exp(0.6254804), A=math.exp(6.255414), B=math.exp(7.3049974), alpha=0.3526596,
        beta=0.3526596,
        source="Muennighoff et al. 2023, 'Scaling Data-Constrained Language Models' (released fit: base law "
               "with R_D*=15.387756, R_N*=5.309743)"),
}
# What `maxmodel plan --unique-tokens` uses unless --law picks another base.
DATA_CONSTRAINED_LAW = "muennighoff"

# The unrounded Approach-3 constants from the arXiv TeX source of Hoffmann et al., as reported by Besiroglu
# et al. 2024; these (not the rounded eq. 10) reproduce the Approach-3 column of Table A3.
CHINCHILLA3_UNROUNDED = ParametricLaw(
    "chinchilla-3-unrounded", E=1.6934, A=math.exp(6.0073404), B=math.exp(6.0179186), alpha=0.3392,
    beta=0.2849, source="Hoffmann et al. 2022 TeX source values, via Besiroglu et al. 2024")


def get_law(name: str):
    if name not in LAWS:
        raise ConfigError("--law", f"unknown law '{name}'; known: {', '.join(LAWS)}")
    return LAWS[name]


def tokens_for_loss(law, params: float, target: float) -> float:
    """Tokens D with law.loss(params, D) == target (bisection on log D; loss falls as D grows).
    Returns inf when `params` alone cannot reach the target loss."""
    lo, hi = 1.0, 1e30
    if law.loss(params, hi) >= target:
        return math.inf
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if law.loss(params, mid) > target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-12:
            break
    return hi


def minimise_log(f, lo: float, hi: float, iters: int = 200) -> float:
    """Golden-section search for the minimiser of a unimodal f on [lo, hi], in log space."""
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(math.exp(d))
        if b - a < 1e-10:
            break
    return math.exp((a + b) / 2)
