"""The whole plan for one budget: allocation (N, D) from a scaling law, a concrete shape, FLOPs, time and cost,
memory and layout on the chosen chips, and the experiment config that trains it."""
from __future__ import annotations

import math
from dataclasses import dataclass

from maxmodel.config.errors import ConfigError

from . import emit, hparams
from .flops import forward_flops_per_sequence, six_nd, training_flops
from .hardware import get_chip
from .inference import plan_inference
from .laws import DATA_CONSTRAINED_LAW, get_law
from .layout import choose_layout
from .repeat import constrained_loss, plan_constrained
from .shape import search_shapes

SECONDS_PER_DAY = 86400


@dataclass
class PlanRequest:
    flops: float | None = None
    chip: str | None = None
    chips: int | None = None
    days: float | None = None
    mfu: float = 0.4
    params: float | None = None
    tokens: float | None = None
    law: str | None = None  # None: muennighoff with unique_tokens, else chinchilla-3
    unique_tokens: float | None = None
    inference_tokens: float | None = None
    vocab: int = 32000
    seq_len: int = 4096
    activation: str = "swiglu"
    tensor: int = 1
    tie_embeddings: bool = False
    price_per_chip_hour: float | None = None
    deadline_days: float | None = None
    param_dtype: str = "float32"
    optimizer: str = "adamw"


def _positive(flag: str, value, allow_zero: bool = False):
    if value is None:
        return
    if isinstance(value, float) and math.isnan(value) or (value < 0 if allow_zero else value <= 0):
        raise ConfigError(flag, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(req: PlanRequest) -> None:
    for flag, value in (("--flops", req.flops), ("--chips", req.chips), ("--days", req.days),
                        ("--params", req.params), ("--tokens", req.tokens), ("--vocab", req.vocab),
                        ("--seq-len", req.seq_len), ("--unique-tokens", req.unique_tokens),
                        ("--deadline-days", req.deadline_days), ("--tensor", req.tensor)):
        _positive(flag, value)
    _positive("--inference-tokens", req.inference_tokens, allow_zero=True)
    _positive("--price-per-chip-hour", req.price_per_chip_hour, allow_zero=True)
    if not 0 < req.mfu <= 1:
        raise ConfigError("--mfu", f"must be in (0, 1], got {req.mfu}")
    if req.unique_tokens is not None and req.inference_tokens is not None:
        raise ConfigError("--inference-tokens", "cannot be combined with --unique-tokens")
    if (req.chips or req.days or req.deadline_days) and not req.chip:
        raise ConfigError("--chip", "is needed with --chips, --days or --deadline-days")


def _budget(req: PlanRequest, law, chip) -> tuple[float, str]:
    if req.flops is not None:
        return req.flops, "--flops"
    if chip and req.chips and req.days:
        return req.chips * chip.bf16_flops * req.mfu * req.days * SECONDS_PER_DAY, "--chip/--chips/--days/--mfu"
    if req.params and req.tokens:
        return six_nd(req.params, req.tokens), "6·params·tokens"
    if req.params:
        return law.budget_for_params(req.params), "compute-optimal budget for --params"
    if req.tokens:
        lo, hi = 1.0, 1e40
        for _ in range(300):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if law.optimal(mid)[1] < req.tokens else (lo, mid)
        return hi, "compute-optimal budget for --tokens"
    raise ConfigError("--flops", "give a budget: --flops C, or --chip X --chips K --days T [--mfu M], "
                                 "or --params N and/or --tokens D")


def make_plan(req: PlanRequest) -> dict:
    validate(req)
    law = get_law(req.law or (DATA_CONSTRAINED_LAW if req.unique_tokens is not None else "chinchilla-3"))
    chip = get_chip(req.chip) if req.chip else None
    flops, budget_from = _budget(req, law, chip)

    if req.params and req.tokens:
        n, d = req.params, req.tokens
    elif req.params:
        n, d = req.params, flops / (6 * req.params)
    elif req.tokens:
        n, d = flops / (6 * req.tokens), req.tokens
    else:
        n, d = law.optimal(flops)
    out: dict = {"budget": {"flops": flops, "from": budget_from, "mfu": req.mfu},
                 "law": {"name": law.name, "source": law.source, "param_kind": law.param_kind}}
    if chip:
        out["budget"].update(chip=chip.name, chips=req.chips, days=req.days)
    if req.unique_tokens is not None:
        dc = plan_constrained(law, flops, req.unique_tokens)
        if not (req.params or req.tokens):
            n, d = dc["params"], dc["tokens"]
        out["data_constrained"] = dc
    if req.inference_tokens is not None:
        inf = plan_inference(law, flops, req.inference_tokens)
        if not (req.params or req.tokens):
            n, d = inf["params"], inf["tokens"]
        out["inference"] = inf
    if req.unique_tokens is not None:  # the loss this allocation reaches with repeated data
        loss = constrained_loss(law, n, d, req.unique_tokens)[0]
    else:
        loss = law.loss(n, d) if law.loss is not None else None
    out["allocation"] = {"params": n, "tokens": d, "tokens_per_param": d / n, "loss": loss}

    shapes = search_shapes(n, vocab=req.vocab, activation=req.activation, tensor=req.tensor,
                           tie_embeddings=req.tie_embeddings, count=law.param_kind)
    shape = shapes[0]
    total = shape.params["total"]
    out["shape"] = {**shape.as_model(), "params": shape.params, "error": shape.error, "aspect": shape.aspect}
    out["shape_candidates"] = [{**s.as_model(), "params_total": s.params["total"], "error": s.error,
                                "aspect": s.aspect} for s in shapes]

    exact = training_flops(shape.as_model(), d, req.seq_len)
    out["flops"] = {"6ND": six_nd(total, d), "appendix_f": exact, "ratio": exact / six_nd(total, d),
                    "seq_len": req.seq_len,
                    "forward_per_sequence": forward_flops_per_sequence(shape.as_model(), req.seq_len)["forward"]}

    train_flops = six_nd(total, d)   # MFU is quoted against 6·N per token, so time uses the same count
    chips = req.chips
    if chip:
        rate = chip.bf16_flops * req.mfu
        if chips is None and req.deadline_days:
            chips = math.ceil(train_flops / (rate * req.deadline_days * SECONDS_PER_DAY))
            out["chips_for_deadline"] = {"deadline_days": req.deadline_days, "chips": chips}
        if chips:
            days = train_flops / (chips * rate * SECONDS_PER_DAY)
            out["time"] = {"days": days, "chip_hours": chips * days * 24, "chips": chips, "chip": chip.name}
            if req.price_per_chip_hour is not None:
                out["time"]["cost"] = out["time"]["chip_hours"] * req.price_per_chip_hour
                out["time"]["price_per_chip_hour"] = req.price_per_chip_hour
        else:
            out["time"] = {"chip_days": train_flops / (rate * SECONDS_PER_DAY), "chip": chip.name}

    batch = hparams.batch_sequences(flops, req.seq_len, d, multiple_of=chips or 1)
    lay = None
    if chip and chips:
        lay = choose_layout(shape.as_model(), total, chip, chips, batch, req.seq_len,
                            6 * total * batch * req.seq_len, req.mfu, param_dtype=req.param_dtype,
                            optimizer=req.optimizer)
        out["layout"] = lay
    out["config"] = emit.build_config(shape, tokens=d, flops=flops, batch=batch, seq_len=req.seq_len,
                                      layout=lay["chosen"] if lay and lay["fits"] else None,
                                      param_dtype=req.param_dtype, optimizer=req.optimizer)
    out["chip_kind"] = chip.kind if chip else None
    out["chips"] = chips
    return out
