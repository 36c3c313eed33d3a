"""Values computed from other values, in one place. Runs once after all layers are applied."""
from __future__ import annotations

from .schema import Config


def round_up(value: float, multiple: int) -> int:
    return -(-round(value) // multiple) * multiple


def derive_values(cfg: Config) -> Config:
    m = cfg.model
    if m.num_kv_heads == 0:
        m.num_kv_heads = m.num_heads
    if m.head_dim == 0 and m.num_heads > 0:
        m.head_dim = m.d_model // m.num_heads
    if m.arch == "encoder_decoder" and m.num_encoder_layers == 0:
        m.num_encoder_layers = m.num_layers
    if m.d_ff == 0:
        m.d_ff = round_up(m.d_ff_multiplier * m.d_model, max(1, m.d_ff_multiple_of))
    if m.moe.num_experts and m.moe.d_ff == 0:
        m.moe.d_ff = m.d_ff
    if cfg.train.objective in ("reward", "ppo"):  # a reward model / PPO's value head: a scalar head
        m.score_head = True
    if cfg.optimizer.decay_steps == 0:
        cfg.optimizer.decay_steps = cfg.train.steps
    return cfg
