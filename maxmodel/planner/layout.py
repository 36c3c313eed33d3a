"""Choose a mesh (data × fsdp × tensor × stage), remat policy and micro-batching that fits the chip's HBM with
the least estimated step time.

Per-step estimates, per chip, assuming no overlap of communication with compute (pessimistic):
- compute: training FLOPs of the step / (chips · peak · MFU), plus recomputation (full remat repeats the
  forward pass, +1/3; save_dots recomputes the attention scores and elementwise ops, ~+3% as Korthikanti et
  al. 2022 measured for selective recomputation);
- data: ring all-reduce of the gradient shard, 2·(n−1)/n of its bytes;
- fsdp: all-gather of the weights for forward and backward and reduce-scatter of the grads, (n−1)/n of the
  layer-sharded bytes each, once per micro-batch for the gathers;
- tensor: Megatron's 4 all-reduces of the s·b·h activations per layer per micro-batch (2 forward,
  2 backward), 2·(n−1)/n each (sequence parallelism moves the same bytes as all-gather + reduce-scatter);
- stage: the 1F1B pipeline bubble, (p−1)/(m+p−1) of the compute time.
Bytes go over the chip's interconnect bandwidth (hardware.Chip.link_bw).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .hardware import Chip, GiB
from .memory import DTYPE_BYTES, REMAT, activation_bytes, state_bytes
from .shape import _get

HBM_USABLE = 0.9          # leave room for XLA's scratch buffers and fragmentation
RECOMPUTE_COST = {"none": 0.0, "save_dots": 0.03, "full": 1 / 3}


@dataclass
class Layout:
    data: int
    fsdp: int
    tensor: int
    stage: int
    remat: str
    microbatches: int
    memory: dict = field(default_factory=dict)
    times: dict = field(default_factory=dict)
    fits: bool = False

    @property
    def mesh(self) -> dict:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor, "stage": self.stage}

    def as_dict(self) -> dict:
        return {"mesh": self.mesh, "remat": self.remat, "microbatches": self.microbatches, "fits": self.fits,
                "memory_gib": {k: v / GiB for k, v in self.memory.items()}, "times_s": self.times}


def _pow2_divisors(n: int, limit: int) -> list[int]:
    out, x = [], 1
    while x <= min(n, limit):
        if n % x == 0:
            out.append(x)
        x *= 2
    return out


def _divisors(n: int) -> list[int]:
    return [x for x in range(1, n + 1) if n % x == 0]


def layout_memory(layout: Layout, model, n_params: float, global_batch: int, seq_len: int, param_dtype: str,
                  compute_dtype: str, optimizer: str, flash: bool = True, loss_chunk: int = 0,
                  sequence_parallel: bool = True) -> dict:
    """Bytes per chip of a layout: state, the compute-dtype copy of the parameters, saved activations and
    working sets, gathered weights; `total` their sum."""
    d, f, t, p, m = layout.data, layout.fsdp, layout.tensor, layout.stage, layout.microbatches
    micro = global_batch // (d * f) // m
    cbytes = DTYPE_BYTES[compute_dtype]
    state = state_bytes(n_params, f * t * p, param_dtype, optimizer)
    # Mixed precision: the step casts the (sharded) parameters to the compute dtype once, before the layers.
    cast = n_params / (f * t * p) * cbytes if cbytes != DTYPE_BYTES[param_dtype] else 0.0
    tables = _get(model, "vocab_size") * _get(model, "d_model") * (1 if _get(model, "tie_embeddings") else 2)
    layer_params = max(n_params - tables, 0)
    gather = 2 * layer_params / _get(model, "num_layers") / t * cbytes if f > 1 else 0.0  # this + next layer
    acts = activation_bytes(model, seq_len, micro, tensor=t, remat=layout.remat, act_bytes=cbytes, flash=flash,
                            loss_chunk=loss_chunk, sequence_parallel=sequence_parallel, gathered_tables=f > 1,
                            layer_grad_bytes=layer_params / (f * t * p) * DTYPE_BYTES[param_dtype])
    memory = {**state, "compute_copy": cast, "activations": acts, "fsdp_gather": gather}
    memory["total"] = sum(memory.values())
    return memory


def evaluate(layout: Layout, model, n_params: float, chip: Chip, chips: int, global_batch: int, seq_len: int,
             step_flops: float, mfu: float, param_dtype: str, compute_dtype: str, optimizer: str) -> Layout:
    d, f, t, p, m = layout.data, layout.fsdp, layout.tensor, layout.stage, layout.microbatches
    micro = global_batch // (d * f) // m
    pbytes, cbytes = DTYPE_BYTES[param_dtype], DTYPE_BYTES[compute_dtype]
    layers = _get(model, "num_layers")
    layout.memory = layout_memory(layout, model, n_params, global_batch, seq_len, param_dtype, compute_dtype,
                                  optimizer)
    layout.fits = layout.memory["total"] <= HBM_USABLE * chip.hbm_bytes

    compute = step_flops / (chips * chip.bf16_flops * mfu)
    recompute = compute * RECOMPUTE_COST[layout.remat]
    grad_shard = n_params / (f * t * p) * pbytes
    data_comm = 2 * (d - 1) / d * grad_shard if d > 1 else 0.0
    layer_sharded = n_params / (t * p)
    fsdp_comm = ((f - 1) / f * layer_sharded * (2 * m * cbytes + pbytes)) if f > 1 else 0.0
    act = seq_len * micro * _get(model, "d_model") * cbytes
    tensor_comm = 4 * 2 * (t - 1) / t * act * (layers / p) * m if t > 1 else 0.0
    bubble = (compute + recompute) * (p - 1) / (m + p - 1) if p > 1 else 0.0
    comm = (data_comm + fsdp_comm + tensor_comm) / chip.link_bw
    layout.times = {"compute": compute, "recompute": recompute, "communication": comm, "bubble": bubble,
                    "step": compute + recompute + comm + bubble,
                    "comm_bytes": {"data": data_comm, "fsdp": fsdp_comm, "tensor": tensor_comm}}
    return layout


def candidates(model, chips: int, global_batch: int, max_tensor: int = 8, max_stage: int = 16):
    heads = _get(model, "num_heads")
    kv = _get(model, "num_kv_heads", 0) or heads
    layers = _get(model, "num_layers")
    for t in _pow2_divisors(chips, max_tensor):
        if heads % t or kv % t:
            continue
        for p in _pow2_divisors(chips // t, max_stage):
            if layers % p:
                continue
            rest = chips // (t * p)
            for f in _divisors(rest):
                d = rest // f
                if global_batch % (d * f):
                    continue
                local = global_batch // (d * f)
                for m in _pow2_divisors(local, 64):
                    if p > 1 and m < p:      # a pipeline needs at least as many micro-batches as stages
                        continue
                    for remat in REMAT:
                        yield Layout(d, f, t, p, remat, m)


def choose_layout(model, n_params: float, chip: Chip, chips: int, global_batch: int, seq_len: int,
                  step_flops: float, mfu: float, param_dtype: str = "float32", compute_dtype: str = "bfloat16",
                  optimizer: str = "adamw", top: int = 5) -> dict:
    args = (model, n_params, chip, chips, global_batch, seq_len, step_flops, mfu, param_dtype, compute_dtype,
            optimizer)
    evaluated = [evaluate(lay, *args) for lay in candidates(model, chips, global_batch)]
    fitting = [x for x in evaluated if x.fits]
    replicated = evaluate(Layout(chips, 1, 1, 1, "none", 1), *args) if global_batch % chips == 0 else None
    if not fitting:
        smallest = min(evaluated, key=lambda x: x.memory["total"]) if evaluated else None
        return {"fits": False, "chosen": smallest.as_dict() if smallest else None, "candidates": [],
                "why": (f"no layout fits {chip.name}'s {chip.hbm_bytes / GiB:.0f} GiB HBM: the smallest needs "
                        f"{smallest.memory['total'] / GiB:.1f} GiB per chip; use more chips or a bigger chip"
                        if smallest else f"no mesh divides {chips} chips and batch {global_batch}")}
    # Least estimated step time; among equals prefer fewer model-parallel axes and less recomputation.
    fitting.sort(key=lambda x: (round(x.times["step"], 9), x.tensor * x.stage, REMAT.index(x.remat),
                                x.microbatches, x.fsdp))
    best = fitting[0]
    return {"fits": True, "chosen": best.as_dict(), "candidates": [x.as_dict() for x in fitting[:top]],
            "why": _why(best, replicated, chip)}


def _why(best: Layout, replicated: Layout | None, chip: Chip) -> str:
    mem, tm = best.memory, best.times
    state = mem["params"] + mem["grads"] + mem["optimizer"]
    parts = [(f"fits in {mem['total'] / GiB:.1f} of {chip.hbm_bytes / GiB:.0f} GiB per chip "
             f"(state {state / GiB:.1f} GiB sharded {best.fsdp * best.tensor * best.stage}-way, activations "
             f"{mem['activations'] / GiB:.1f} GiB with remat={best.remat})")]
    parts.append(f"estimated step {tm['step']:.3g} s = compute {tm['compute']:.3g} s + recompute "
                 f"{tm['recompute']:.3g} s + communication {tm['communication']:.3g} s + bubble "
                 f"{tm['bubble']:.3g} s, the least of the layouts that fit")
    if replicated is not None and not replicated.fits:
        parts.append(f"plain data parallelism would need {replicated.memory['total'] / GiB:.1f} GiB per chip")
    if best.tensor == 1 and best.fsdp > 1:
        parts.append("weights sharded with fsdp rather than tensor parallelism, whose per-layer activation "
                     "all-reduces were estimated slower")
    if best.stage > 1:
        parts.append(f"pipeline of {best.stage} stages because the state does not fit otherwise")
    return "; ".join(parts)
