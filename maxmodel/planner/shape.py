"""Parameter counts from a model shape, and the search for a concrete shape with a target parameter count.

Counting convention (Chinchilla counts everything; Kaplan's "non-embedding" drops the vocabulary and position
tables): `embedding` = token embedding + learned position table + the output head when it is not tied;
`non_embedding` = everything else (attention, MLP, norms, router).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

from maxmodel.config.errors import ConfigError

GATED = ("swiglu", "geglu")


def _get(cfg, name, default=None):
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def count_params(model_cfg) -> dict:
    """Parameters of a decoder-only transformer from its shape, without building it.

    Accepts a `maxmodel.config.schema.ModelConfig` (after `load_config`, so head_dim and d_ff are filled) or a
    dict with the same keys. Returns total, non_embedding, embedding and, for mixture-of-experts, active (the
    parameters one token uses: top_k of the routed experts plus the shared ones).
    """
    d = _get(model_cfg, "d_model")
    layers = _get(model_cfg, "num_layers")
    heads = _get(model_cfg, "num_heads")
    kv = _get(model_cfg, "num_kv_heads", 0) or heads
    hd = _get(model_cfg, "head_dim", 0) or d // heads
    d_ff = _get(model_cfg, "d_ff")
    vocab = _get(model_cfg, "vocab_size")
    act = _get(model_cfg, "activation", "swiglu")
    bias = bool(_get(model_cfg, "use_bias", False))
    attn_cfg = _get(model_cfg, "attention")
    qkv_bias = bool(_get(attn_cfg, "qkv_bias", False)) if attn_cfg is not None else False
    norm = _get(model_cfg, "norm", "rmsnorm")
    positional = _get(model_cfg, "positional", "rope")
    tied = bool(_get(model_cfg, "tie_embeddings", False))
    moe = _get(model_cfg, "moe")
    if not d_ff:
        raise ConfigError("model.d_ff", "is 0; count parameters on a resolved config (load_config fills it)")

    # Norm: RMSNorm has a scale; LayerNorm a scale and a bias.
    norm_p = d * (2 if norm == "layernorm" else 1)
    attn = d * heads * hd + 2 * d * kv * hd + heads * hd * d
    if qkv_bias or bias:
        attn += heads * hd + 2 * kv * hd
    if bias:
        attn += d

    def mlp(width):
        p = (3 if act in GATED else 2) * d * width
        if bias:
            p += (2 if act in GATED else 1) * width + d
        return p

    experts = _get(moe, "num_experts", 0) if moe is not None else 0
    per_dense = attn + mlp(d_ff) + 2 * norm_p
    if experts:
        e_ff = _get(moe, "d_ff", 0) or d_ff
        every = max(1, _get(moe, "every", 1))
        first_dense = _get(moe, "first_dense_layers", 0)
        shared = _get(moe, "shared_experts", 0)
        top_k = _get(moe, "top_k", 2)
        moe_layers = sum(1 for i in range(layers) if i >= first_dense and (i - first_dense) % every == 0)
        dense_layers = layers - moe_layers
        per_moe = attn + 2 * norm_p + d * experts + (experts + shared) * mlp(e_ff)
        per_moe_active = attn + 2 * norm_p + d * experts + (top_k + shared) * mlp(e_ff)
        blocks = dense_layers * per_dense + moe_layers * per_moe
        blocks_active = dense_layers * per_dense + moe_layers * per_moe_active
    else:
        blocks = blocks_active = layers * per_dense

    embedding = vocab * d
    if positional == "learned":
        embedding += _get(model_cfg, "max_seq_len") * d
    head = 0 if tied else vocab * d
    non_embedding = blocks + norm_p   # + final norm
    total = non_embedding + embedding + head
    active = blocks_active + norm_p + embedding + head
    return {"total": int(total), "non_embedding": int(non_embedding), "embedding": int(embedding + head),
            "active": int(active)}


@dataclass
class Shape:
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    activation: str
    tie_embeddings: bool
    params: dict
    error: float          # (count - target) / target
    aspect: float         # d_model / num_layers

    def as_model(self) -> dict:
        return {k: getattr(self, k) for k in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                              "d_ff", "vocab_size", "activation", "tie_embeddings")}


# Width/depth ratios of published dense models: GPT-3 small 64, GPT-3 6.7B/175B 128, LLaMA-65B and
# Chinchilla 102, Gopher-280B 205. Kaplan et al. 2020 (Fig. 5) find loss within a few percent across
# d_model/n_layer from about 20 to 200; we allow [32, 224] and prefer shapes near 100.
ASPECT_RANGE = (32.0, 224.0)
ASPECT_TARGET = 100.0


def _kv_heads(heads: int, tp: int) -> int:
    """GQA with 8 KV heads once there are 16+ query heads (LLaMA-2-70B / LLaMA-3 practice), else MHA;
    KV heads must split evenly over the tensor-parallel degree."""
    kv = 8 if heads >= 16 and heads % 8 == 0 else heads
    return kv if kv % tp == 0 else heads


def search_shapes(target: float, *, vocab: int = 32000, activation: str = "swiglu", tensor: int = 1,
                  tie_embeddings: bool = False, count: str = "total", tolerance: float = 0.02,
                  top: int = 5) -> list[Shape]:
    """Shapes whose `count` parameters are within `tolerance` of `target`, ranked by closeness of the
    width/depth ratio to ~100 and then of the parameter count.

    Dims are hardware-friendly: d_model a multiple of 128, head_dim 128 (64 below d_model 1024), 16+ query
    heads come in multiples of 8 (8 KV heads), d_ff a multiple of 128 (64 below d_model 1024) within ±30% of
    the usual 8/3·d (gated) or 4·d, and query and KV heads divisible by `tensor`.
    """
    if target <= 0:
        raise ConfigError("--params", f"must be > 0, got {target}")
    if activation not in ("swiglu", "geglu", "gelu", "relu"):
        raise ConfigError("--activation", f"'{activation}' is not one of swiglu, geglu, gelu, relu")
    if tensor < 1:
        raise ConfigError("--tensor", f"must be >= 1, got {tensor}")
    gated = activation in GATED
    mlp_mats = 3 if gated else 2
    # N ≈ 12·L·d² and L = d/aspect bound d_model; widen the bracket since embeddings and d_ff vary.
    d_lo = max(128, int((target * ASPECT_RANGE[0] / 16) ** (1 / 3) * 0.5) // 128 * 128)
    d_hi = int((target * ASPECT_RANGE[1] / 8) ** (1 / 3) * 1.5) + 128
    found: list[Shape] = []
    for d in range(d_lo, d_hi + 1, 128):
        hd = 128 if d >= 1024 else 64
        heads = d // hd
        if heads % tensor or (heads >= 16 and heads % 8):
            continue
        kv = _kv_heads(heads, tensor)
        step = 128 if d >= 1024 else 64
        usual = (8 / 3 if gated else 4) * d
        attn = 2 * d * heads * hd + 2 * d * kv * hd
        embed = vocab * d * (1 if tie_embeddings else 2) if count == "total" else 0
        fixed = embed + d                                  # embeddings + final norm
        lo_l = max(1, math.ceil(d / ASPECT_RANGE[1]))
        hi_l = int(d / ASPECT_RANGE[0])
        for layers in range(lo_l, hi_l + 1):
            ff_exact = ((target - fixed) / layers - attn - 2 * d) / (mlp_mats * d)
            for ff in {int(ff_exact // step) * step, int(ff_exact // step + 1) * step}:
                if not 0.7 * usual <= ff <= 1.3 * usual:
                    continue
                model = SimpleNamespace(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                                        head_dim=hd, d_ff=ff, vocab_size=vocab, activation=activation,
                                        tie_embeddings=tie_embeddings, norm="rmsnorm", positional="rope",
                                        use_bias=False, attention=None, moe=None)
                params = count_params(model)
                err = (params[count] - target) / target
                if abs(err) <= tolerance:
                    found.append(Shape(d, layers, heads, kv, hd, ff, vocab, activation, tie_embeddings, params,
                                       err, d / layers))
    def score(s: Shape) -> float:
        usual = (8 / 3 if gated else 4) * s.d_model
        return abs(math.log(s.aspect / ASPECT_TARGET)) + abs(math.log(s.d_ff / usual)) + 10 * abs(s.error)

    # One candidate per width, so the list shows genuinely different shapes.
    best: dict[int, Shape] = {}
    for s in found:
        if s.d_model not in best or score(s) < score(best[s.d_model]):
            best[s.d_model] = s
    ranked = sorted(best.values(), key=score)
    if not ranked:
        raise ConfigError("--params", f"no shape with {count} parameters within {tolerance:.0%} of {target:.3g} "
                                      f"(vocab {vocab}); try a smaller --vocab or a larger budget")
    return ranked[:top]
