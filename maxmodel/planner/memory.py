"""Bytes per chip for training state and activations.

State: parameters, gradients and optimizer moments, sharded over the fsdp, tensor and stage axes (the data axis
replicates them). Mixed precision as maxmodel trains: params and grads in `param_dtype`, AdamW keeps two
moments in the same dtype as the params (optax's default).

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
Section 4: per layer, with 16-bit activations, sequence length s, micro-batch b, hidden h, heads a, tensor
parallel t, a GPT layer stores s·b·h·(34 + 5·a·s/h) bytes; with tensor parallelism
s·b·h·(10 + 24/t + 5·a·s/(h·t)); adding sequence parallelism divides everything by t; selective recomputation
drops the 5·a·s/h attention-score term; full recomputation keeps only the 2·s·b·h layer input.
`layer_activation_bytes` itemises the same terms so that GQA, gated MLPs, no dropout and flash attention
(which, like selective recompute, never stores the s×s scores) fit the same accounting; with a GPT layer it
equals the paper's formulas exactly.
"""
from __future__ import annotations

from .shape import GATED, _get

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZER_MOMENTS = {"adamw": 2, "adam": 2, "lion": 1, "sgd": 0, "adafactor": 0}   # copies of the params
REMAT = ("none", "save_dots", "full")


def state_bytes(n_params: float, shards: int, param_dtype: str = "float32", optimizer: str = "adamw") -> dict:
    p = DTYPE_BYTES[param_dtype]
    per = n_params / shards
    return {"params": per * p, "grads": per * p, "optimizer": per * p * OPTIMIZER_MOMENTS[optimizer]}


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
                            recompute: str = "none") -> float:
    """The paper's closed forms (Section 4.1-4.3, Table 2) for one GPT layer, 16-bit activations, dropout on."""
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sequence_parallel else 1)
    score = 0 if recompute == "selective" else 5 * a * s / h
    if sequence_parallel:
        return sbh * (34 + score) / t
    return sbh * (10 + 24 / t + score / t)


def layer_activation_bytes(model, seq_len: int, micro_batch: int, *, tensor: int = 1,
                           sequence_parallel: bool = True, remat: str = "none", flash: bool = True,
                           dropout: bool = False, act_bytes: int = 2) -> float:
    """Bytes one transformer layer keeps for the backward pass, per chip."""
    s, b, e = seq_len, micro_batch, act_bytes
    d = _get(model, "d_model")
    heads = _get(model, "num_heads")
    kv = _get(model, "num_kv_heads", 0) or heads
    hd = _get(model, "head_dim", 0) or d // heads
    f = _get(model, "d_ff")
    sb = s * b
    q, k = heads * hd, kv * hd
    rep_div = tensor if sequence_parallel else 1
    if remat == "full":
        return e * sb * d / rep_div            # only the layer input survives; the rest is recomputed
    # Outside the tensor-parallel region: two norm inputs, attention and MLP block inputs, two dropout masks.
    replicated = 2 * e * sb * d + e * sb * d + e * sb * d + (2 * sb * d if dropout else 0)
    # Inside it: Q and K, V, the output-projection input, the MLP intermediates.
    parallel = e * sb * (q + k) + e * sb * k + e * sb * q
    parallel += (3 if _get(model, "activation", "swiglu") in GATED else 2) * e * sb * f
    if flash or remat == "save_dots":
        parallel += 4 * heads * sb             # fp32 log-sum-exp per row; the s×s scores are recomputed
    else:
        parallel += e * heads * s * sb + ((1 + e) * heads * s * sb if dropout else 0)
    return replicated / rep_div + parallel / tensor


def activation_bytes(model, seq_len: int, micro_batch: int, *, tensor: int = 1, sequence_parallel: bool = True,
                     remat: str = "none", flash: bool = True, act_bytes: int = 2) -> float:
    """All layers' saved activations plus the logits, per chip. With a 1F1B pipeline the first stage holds
    `stage` micro-batches of L/stage layers, i.e. L layers' worth, so the stage count drops out."""
    layers = _get(model, "num_layers")
    kw = {"tensor": tensor, "sequence_parallel": sequence_parallel, "flash": flash, "act_bytes": act_bytes}
    stored = layers * layer_activation_bytes(model, seq_len, micro_batch, remat=remat, **kw)
    if remat == "full":   # one layer is rebuilt at a time during the backward pass
        stored += layer_activation_bytes(model, seq_len, micro_batch, remat="none", **kw)
    # Logits in the compute dtype plus the float32 copy the loss works on, split over the vocab by tensor.
    logits = seq_len * micro_batch * _get(model, "vocab_size") * (act_bytes + 4) / tensor
    return stored + logits
