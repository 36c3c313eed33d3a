"""Training FLOPs: the 6·N·D rule and the itemised count of Hoffmann et al. 2022, Appendix F.

Appendix F, per sequence of length s, forward pass (a multiply-accumulate counts 2):
  embeddings 2·s·V·d;  per layer: QKV projections 2·3·s·d·(kq·H), QK logits 2·s²·(kq·H), softmax 3·H·s²,
  softmax @ V 2·s²·(kq·H), output projection 2·s·(kq·H)·d, MLP 2·s·(d·f + d·f);  final logits 2·s·d·V.
Backward = 2 × forward. Here K/V projections use the KV-head count (GQA) and a gated MLP (SwiGLU/GeGLU) has
three d×f matrices instead of two; with MHA and a plain MLP the formula is Appendix F's exactly.

Table A4 of the paper (its ratio to 6ND) is reproduced only without the embedding and logit terms: the
printed table was computed that way, unlike the text (as found when nanoGPT's scaling-laws notebook
reproduced it); `embeddings=False` gives that variant.
"""
from __future__ import annotations

from .shape import GATED, _get


def forward_flops_per_sequence(model, seq_len: int, embeddings: bool = True) -> dict:
    s = seq_len
    d = _get(model, "d_model")
    heads = _get(model, "num_heads")
    kv = _get(model, "num_kv_heads", 0) or heads
    hd = _get(model, "head_dim", 0) or d // heads
    f = _get(model, "d_ff")
    vocab = _get(model, "vocab_size")
    layers = _get(model, "num_layers")
    mats = 3 if _get(model, "activation", "swiglu") in GATED else 2
    q, k = heads * hd, kv * hd
    per_layer = {
        "qkv": 2 * s * d * (q + 2 * k),
        "qk_logits": 2 * s * s * q,
        "softmax": 3 * heads * s * s,
        "softmax_v": 2 * s * s * q,
        "out_proj": 2 * s * q * d,
        "mlp": 2 * s * mats * d * f,
    }
    parts = {"embeddings": 2 * s * vocab * d if embeddings else 0,
             "layers": layers * sum(per_layer.values()),
             "logits": 2 * s * d * vocab if embeddings else 0}
    return {"per_layer": per_layer, **parts, "forward": sum(parts.values())}


def training_flops(model, tokens: float, seq_len: int, embeddings: bool = True) -> float:
    """Forward + backward (2× forward) FLOPs to train on `tokens` tokens in sequences of `seq_len`."""
    per_seq = forward_flops_per_sequence(model, seq_len, embeddings)["forward"]
    return 3 * per_seq * tokens / seq_len


def six_nd(params: float, tokens: float) -> float:
    return 6 * params * tokens
