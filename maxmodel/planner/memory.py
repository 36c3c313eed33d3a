"""Bytes per chip for training state and activations.

State: parameters, gradients and optimizer moments, sharded over the fsdp, tensor and stage axes (the data axis
replicates them). Mixed precision as maxmodel trains: params and grads in `param_dtype`, AdamW keeps two
moments in the same dtype as the params (optax's default).

Activations: `layer_activation_bytes` is what maxmodel's compiled step keeps per layer under each `train.remat`
policy, itemised from XLA:TPU buffer assignments of llama3-8b-shaped steps (benchmarks/aot_memory.py, whose
table in benchmarks/RESULTS.md also sets the estimate beside the compiled figure); `activation_bytes` adds the
working set of the backward pass (the output head's logits, or one layer rebuilt, with XLA attention's [s, s]
tensors). Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", gives the
closed forms for a Megatron GPT layer (`korthikanti_layer_bytes`): s·b·h·(34 + 5·a·s/h) bytes with 16-bit
activations, /t with sequence parallelism; XLA keeps more than Megatron's fused kernels do (float32 norm
tensors, both halves of a gated MLP before and after the activation).
"""
from __future__ import annotations

from .shape import GATED, _get

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZER_MOMENTS = {"adamw": 2, "adam": 2, "lion": 1, "sgd": 0, "adafactor": 0}   # copies of the params
REMAT = ("none", "save_dots", "full")   # the policies the layout search tries (all of models/remat.py are costed)


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


def _widths(model) -> dict:
    d = _get(model, "d_model")
    heads = _get(model, "num_heads")
    kv = _get(model, "num_kv_heads", 0) or heads
    hd = _get(model, "head_dim", 0) or d // heads
    moe = _get(model, "moe")
    experts = _get(moe, "num_experts", 0) if moe is not None else 0
    f = _get(model, "d_ff")
    if experts:   # each token's k copies pass through an expert MLP of width moe.d_ff (plus shared experts)
        f = ((_get(moe, "d_ff", 0) or f) * (_get(moe, "top_k", 2) + _get(moe, "shared_experts", 0)))
    return {"d": d, "heads": heads, "q": heads * hd, "k": kv * hd, "f": f, "experts": experts,
            "gated": _get(model, "activation", "swiglu") in GATED}


def layer_activation_bytes(model, seq_len: int, micro_batch: int, *, tensor: int = 1,
                           sequence_parallel: bool = True, remat: str = "none", flash: bool = True,
                           dropout: bool = False, act_bytes: int = 2) -> float:
    """Bytes one transformer layer keeps for the backward pass, per chip, as maxmodel's compiled step keeps them.

    Measured on XLA:TPU buffer assignments (benchmarks/aot_memory.py): without remat a layer keeps, per token,
    three d-wide and the q/k/v-wide tensors (q twice: before and after RoPE) in the compute dtype, four
    float32 d-wide norm tensors, and six f-wide MLP tensors when gated (four otherwise); XLA attention also
    keeps the [s, s] probabilities per head (float32 and compute dtype). With a remat policy only what the policy names survives
    (maxmodel/models/remat.py). Korthikanti et al.'s closed forms are `korthikanti_layer_bytes`."""
    w, e, sb = _widths(model), act_bytes, seq_len * micro_batch
    d, q, k, f = w["d"], w["q"], w["k"], w["f"]
    rep_div = tensor if sequence_parallel else 1
    if remat in ("full", "qkv_proj_offloaded", "save_dots_offloaded"):
        return e * sb * d / rep_div            # the layer input; the rest is recomputed or in host memory
    if remat == "save_qkv_proj":
        return e * sb * (d / rep_div + (q + 2 * k) / tensor)
    if remat == "save_dot_except_mlp":
        return e * sb * (2 * d / rep_div + (q + 2 * k) / tensor)
    if remat == "save_dots":                   # every matmul without batch dims: projections and MLP
        return e * sb * (3 * d / rep_div + (q + 2 * k + (2 if w["gated"] else 1) * f) / tensor)
    replicated = 3 * e * sb * d + 4 * 4 * sb * d + (2 * sb * d if dropout else 0)
    parallel = e * sb * (2 * q + 2 * k) + (6 if w["gated"] else 4) * e * sb * f
    if w["experts"]:                           # the router's float32 logits and the sorted token copies
        parallel += 4 * sb * w["experts"] + 2 * e * sb * d * _get(_get(model, "moe"), "top_k", 2)
    if flash:
        parallel += 4 * w["heads"] * sb        # float32 log-sum-exp per row; the scores are recomputed
    else:
        # the float32 probabilities and a compute-dtype copy of every head's [s, s] scores
        parallel += (4 + e) * w["heads"] * seq_len * sb + ((1 + e) * w["heads"] * seq_len * sb if dropout else 0)
    return replicated / rep_div + parallel / tensor


def attention_working_bytes(model, seq_len: int, micro_batch: int, *, tensor: int = 1, flash: bool = True,
                            act_bytes: int = 2) -> float:
    """Bytes the attention of one layer holds while it is differentiated: XLA materialises [s, s] tensors for
    every head, float32 scores and probabilities at least (compute-dtype copies come and go: the buffer
    assignments show 8-16 bytes per score at peak across shapes, 8 where the scores dominate); a flash
    kernel works in tiles."""
    if flash:
        return 0.0
    w = _widths(model)
    return 8 * w["heads"] / tensor * seq_len * seq_len * micro_batch


def logits_bytes(model, seq_len: int, micro_batch: int, *, tensor: int = 1, act_bytes: int = 2,
                 loss_chunk: int = 0, gathered_tables: bool = False) -> float:
    """The output head's working set: logits in float32 and the compute dtype over the vocabulary split by
    tensor (a fused chunked loss, `train.loss_chunk`, holds one chunk of positions at a time), plus the
    embedding and output tables gathered in the compute dtype when fsdp shards them."""
    positions = min(loss_chunk, seq_len) if loss_chunk else seq_len
    vocab, d = _get(model, "vocab_size"), _get(model, "d_model")
    tables = 2 * act_bytes * vocab * d / tensor if gathered_tables else 0.0
    return (4 + act_bytes) * positions * micro_batch * vocab / tensor + tables


def activation_bytes(model, seq_len: int, micro_batch: int, *, tensor: int = 1, sequence_parallel: bool = True,
                     remat: str = "none", flash: bool = True, act_bytes: int = 2, loss_chunk: int = 0,
                     layer_grad_bytes: float = 0.0, gathered_tables: bool = False) -> float:
    """All layers' saved activations plus the larger of the two working sets of the backward pass, per chip:
    the output head's (logits) or one layer's (its backward temporaries, as large as what it keeps without
    remat, whether rebuilt or not, and XLA attention's [s, s] tensors).
    The head is differentiated before any layer, so its working set may use the room of the layers' gradients
    (`layer_grad_bytes`, counted with the state), which do not exist yet. With a 1F1B pipeline the first stage
    holds `stage` micro-batches of L/stage layers, i.e. L layers' worth, so the stage count drops out."""
    layers = _get(model, "num_layers")
    kw = {"tensor": tensor, "flash": flash, "act_bytes": act_bytes}
    stored = layers * layer_activation_bytes(model, seq_len, micro_batch, remat=remat,
                                             sequence_parallel=sequence_parallel, **kw)
    layer = attention_working_bytes(model, seq_len, micro_batch, **kw) + layer_activation_bytes(
        model, seq_len, micro_batch, remat="none", sequence_parallel=sequence_parallel, **{**kw, "flash": True})
    head = logits_bytes(model, seq_len, micro_batch, tensor=tensor, act_bytes=act_bytes, loss_chunk=loss_chunk,
                        gathered_tables=gathered_tables)
    return stored + max(layer, head - layer_grad_bytes)
