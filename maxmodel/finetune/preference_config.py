"""Checks of the `dpo.*` keys and of preference data (called from config/validate.py); each names its key."""
from __future__ import annotations

from maxmodel.config.errors import ConfigError

PREFERENCE_OBJECTIVES = ("reward", "dpo", "ipo", "orpo", "simpo", "kto")
REFERENCE_OBJECTIVES = ("dpo", "ipo", "kto")  # the ones with a frozen reference policy
REFERENCES = ("live", "precomputed")


def validate_preference(cfg) -> None:
    d, t = cfg.dpo, cfg.train
    if t.objective not in PREFERENCE_OBJECTIVES:
        if cfg.data.format == "preference" and cfg.data.source != "mixture":
            raise ConfigError("data.format", f"preference records train {', '.join(PREFERENCE_OBJECTIVES)}, "
                                             f"not train.objective={t.objective}")
        return
    for key in ("beta", "kto_desirable_weight", "kto_undesirable_weight"):
        if getattr(d, key) <= 0:
            raise ConfigError(f"dpo.{key}", f"must be > 0, got {getattr(d, key)}")
    for key in ("orpo_lambda", "simpo_gamma"):
        if getattr(d, key) < 0:
            raise ConfigError(f"dpo.{key}", f"must be >= 0, got {getattr(d, key)}")
    if not 0 <= d.label_smoothing < 0.5:
        raise ConfigError("dpo.label_smoothing", f"must be in [0, 0.5), got {d.label_smoothing}")
    if d.reference not in REFERENCES:
        raise ConfigError("dpo.reference", f"{d.reference!r} is not one of {', '.join(REFERENCES)}")
    if d.max_docs < 2 or d.max_docs % 2:
        raise ConfigError("dpo.max_docs", f"must be an even number >= 2 (pairs fill rows two documents at a "
                                          f"time), got {d.max_docs}")
    if cfg.data.source not in ("jsonl", "mixture"):
        raise ConfigError("data.source", f"train.objective={t.objective} reads preference records from jsonl "
                                         f"files, not data.source={cfg.data.source}")
    if t.objective in REFERENCE_OBJECTIVES and cfg.peft.method == "prompt":
        raise ConfigError("peft.method", "soft prompts have no adapter-free reference inside the model; use "
                                         "lora, qlora, adapter or none")
