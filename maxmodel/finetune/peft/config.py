"""Checks of the `peft.*` keys (called from config/validate.py); each failure names its key."""
from __future__ import annotations

from maxmodel.config.errors import ConfigError

METHODS = ("none", "lora", "qlora", "prompt", "adapter")
QAT = ("none", "int8", "int4")
QUANT = ("nf4", "int8")
# Target names (Hugging Face PEFT's module names in parentheses): what each matches in maxmodel's blocks.
TARGETS = {"q": "attn.wq", "k": "attn.wk", "v": "attn.wv", "o": "attn.wo",
           "gate": "mlp.wg", "up": "mlp.wi", "down": "mlp.wo"}
# A MoE layer's stacked expert weights [E, ...] (LoRA targets only: QLoRA and QAT treat the projections above).
EXPERT_TARGETS = {"expert_gate": "mlp.expert_wg", "expert_up": "mlp.expert_wi", "expert_down": "mlp.expert_wo"}
ALL, EXPERTS = "all", "experts"  # every projection above (PEFT's all-linear); every expert weight


def target_names(targets) -> tuple[str, ...]:
    names = [targets] if isinstance(targets, str) else list(targets)
    out = []
    for name in names:
        out += TARGETS if name == ALL else EXPERT_TARGETS if name == EXPERTS else [name]
    return tuple(dict.fromkeys(out))


def prompt_slots(cfg) -> int:
    """Soft-prompt slots the data pipeline leaves at the start of every document (peft.num_virtual_tokens),
    or 0 where the prompt is prepended to each row instead: methods other than prompt, objectives other than
    causal_lm / sft (their rows are not packed documents), synthetic and seqio data (no documents here)."""
    d = cfg.data
    if (cfg.peft.method != "prompt" or cfg.train.objective not in ("causal_lm", "sft")
            or d.source == "synthetic" or d.source.startswith("seqio:")):
        return 0
    return cfg.peft.num_virtual_tokens


def validate_peft(cfg) -> None:
    p = cfg.peft
    if cfg.train.qat not in QAT:
        raise ConfigError("train.qat", f"{cfg.train.qat!r} is not one of {', '.join(QAT)}")
    if p.method not in METHODS:
        raise ConfigError("peft.method", f"{p.method!r} is not one of {', '.join(METHODS)}")
    if p.method == "none":
        return
    if cfg.model.moe.bias_balancing:
        raise ConfigError("model.moe.bias_balancing", f"updates the frozen routing biases, which "
                                                      f"peft.method={p.method} keeps fixed: turn it off")
    if p.method == "prompt":
        return _validate_prompt(cfg)
    if p.method == "adapter":
        if p.adapter_dim <= 0:
            raise ConfigError("peft.adapter_dim", f"must be > 0, got {p.adapter_dim}")
        return
    if p.rank <= 0:
        raise ConfigError("peft.rank", f"must be > 0, got {p.rank}")
    if p.alpha <= 0:
        raise ConfigError("peft.alpha", f"must be > 0, got {p.alpha}")
    if not 0.0 <= p.dropout < 1.0:
        raise ConfigError("peft.dropout", f"must be in [0, 1), got {p.dropout}")
    names = target_names(p.targets)
    folded = [n for n in names if n in EXPERT_TARGETS]
    if p.dropout and folded:
        raise ConfigError("peft.dropout", f"expert adapters ({', '.join(folded)}) are folded into their weights "
                                          f"before dispatch, so their input cannot be dropped: set peft.dropout=0 "
                                          f"or target only dense projections")
    unknown = [n for n in names if n not in TARGETS and n not in EXPERT_TARGETS]
    if unknown or not names:
        raise ConfigError("peft.targets", f"{unknown or names} not among "
                                          f"{', '.join([*TARGETS, ALL, *EXPERT_TARGETS, EXPERTS])}")
    if p.quant not in QUANT:
        raise ConfigError("peft.quant", f"{p.quant!r} is not one of {', '.join(QUANT)}")
    if p.block_size <= 0:
        raise ConfigError("peft.block_size", f"must be > 0, got {p.block_size}")


def _validate_prompt(cfg) -> None:
    p = cfg.peft
    if p.num_virtual_tokens <= 0:
        raise ConfigError("peft.num_virtual_tokens", f"must be > 0, got {p.num_virtual_tokens}")
    if p.num_virtual_tokens >= cfg.train.seq_len:
        raise ConfigError("peft.num_virtual_tokens", f"{p.num_virtual_tokens} leaves no room in train.seq_len="
                                                     f"{cfg.train.seq_len} for tokens")
    if p.num_prompts <= 0:
        raise ConfigError("peft.num_prompts", f"must be > 0, got {p.num_prompts}")
    if cfg.model.arch != "decoder":
        raise ConfigError("peft.method", f"prompt tuning prepends to a decoder's input; model.arch="
                                         f"{cfg.model.arch} is not one")
    if cfg.mesh.sequence > 1:
        raise ConfigError("mesh.sequence", "prompt tuning lengthens rows by peft.num_virtual_tokens, which "
                                           "context parallelism does not split: use mesh.sequence=1")
    need = cfg.train.seq_len + p.num_virtual_tokens
    if cfg.model.positional == "learned" and need > cfg.model.max_seq_len:
        raise ConfigError("peft.num_virtual_tokens", f"train.seq_len + {p.num_virtual_tokens} = {need} exceeds "
                                                     f"model.max_seq_len={cfg.model.max_seq_len}")
