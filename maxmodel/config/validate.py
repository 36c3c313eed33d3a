"""Checks that need more than a type: each failure names the key and the value."""
from __future__ import annotations

from .errors import ConfigError
from .schema import YAML_TO_FIELD, Config

CHOICES = {
    "model.activation": ("swiglu", "geglu", "gelu", "gelu_exact", "relu"),
    "model.norm": ("rmsnorm", "layernorm"),
    "model.norm_position": ("pre", "post"),
    "model.arch": ("decoder", "encoder", "encoder_decoder"),
    "model.positional": ("rope", "learned", "sinusoidal", "none"),
    "model.attention.context_parallel": ("allgather", "ring"),
    "model.attention.impl": ("auto", "xla", "splash", "cudnn", "flash"),
    "model.moe.router": ("softmax", "sigmoid"),
    "model.moe.impl": ("auto", "ragged_dot", "megablox"),  # parallel/grouped_matmul.py
    "model.moe.exchange": ("auto", "padded", "ragged"),  # parallel/token_exchange.py
    "train.dtype": ("float32", "bfloat16", "float16"),
    "train.param_dtype": ("float32", "bfloat16"),
    "train.remat": ("none", "full", "save_dots", "save_dot_except_mlp", "save_qkv_proj", "qkv_proj_offloaded",
                    "save_dots_offloaded"),  # models/remat.py
    "optimizer.name": ("adamw", "adam", "sgd", "lion", "adafactor"),
    "optimizer.schedule": ("cosine", "linear", "wsd", "constant"),
    "data.on_bad_record": ("error", "skip"),
    "train.on_nonfinite": ("skip", "stop"),
    "data.format": ("text", "prompt_completion", "chat", "prompt", "preference"),
    "rl.kl_estimator": ("k1", "k3"),
    "rl.loss_agg": ("grpo", "dr_grpo", "dapo"),
    "data.packing": ("concat", "first_fit", "none"),
    "pipeline.schedule": ("gpipe", "circular", "1f1b", "interleaved_1f1b", "zero_bubble"),
}
POSITIVE = ("pipeline.repeats", "model.attention.block_q", "model.attention.block_kv", "model.vocab_size", "model.d_model", "model.num_layers", "model.num_heads", "model.max_seq_len",
            "train.steps", "train.batch_size", "train.seq_len", "train.microbatches",
            "run.log_every", "run.eval_every", "run.cpu_devices", "checkpoint.keep", "checkpoint.local_keep",
            "rl.group_size", "rl.max_new_tokens", "distill.temperature")
NON_NEGATIVE = ("pipeline.microbatches", "optimizer.lr", "optimizer.warmup_steps", "optimizer.weight_decay", "optimizer.clip_norm",
                "train.z_loss", "train.loss_chunk", "model.num_kv_heads", "model.num_encoder_layers", "model.head_dim", "model.d_ff", "run.eval_batches", "run.eval_limit",
                "checkpoint.every_steps", "checkpoint.every_minutes", "checkpoint.keep_every",
                "checkpoint.local_every_steps", "train.spike_sigma", "train.spike_warmup",
                "data.workers", "data.prefetch",
                "model.attention.global_every", "model.attention.query_pre_attn_scalar", "model.token_types",
                "rl.beta", "rl.epsilon", "rl.epsilon_high", "rl.temperature", "rl.top_k", "distill.alpha",
                "rl.gamma", "rl.gae_lambda", "rl.value_coef", "rl.value_clip",
                "distill.beta")
DATA_SOURCES = ("builtin", "synthetic", "jsonl", "text", "parquet", "arrayrecord", "mixture")


def get(cfg: Config, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, YAML_TO_FIELD.get(part, part))
    return node


def validate(cfg: Config) -> None:
    for key, choices in CHOICES.items():
        if get(cfg, key) not in choices:
            raise ConfigError(key, f"{get(cfg, key)!r} is not one of {', '.join(choices)}")
    for key in POSITIVE:
        if get(cfg, key) <= 0:
            raise ConfigError(key, f"must be > 0, got {get(cfg, key)}")
    for key in NON_NEGATIVE:
        if get(cfg, key) < 0:
            raise ConfigError(key, f"must be >= 0, got {get(cfg, key)}")
    m, t = cfg.model, cfg.train
    if m.num_kv_heads and m.num_heads % m.num_kv_heads:
        raise ConfigError("model.num_kv_heads", f"num_heads={m.num_heads} is not divisible by "
                                                f"num_kv_heads={m.num_kv_heads}")
    if not m.head_dim and m.d_model % m.num_heads:
        raise ConfigError("model.num_heads", f"d_model={m.d_model} is not divisible by num_heads={m.num_heads}")
    if m.positional == "rope" and m.head_dim and m.head_dim % 2:
        raise ConfigError("model.head_dim", f"RoPE needs an even head_dim, got {m.head_dim}")
    if t.loss_chunk and t.seq_len % t.loss_chunk:
        raise ConfigError("train.loss_chunk", f"{t.loss_chunk} does not divide train.seq_len={t.seq_len}")
    if t.profile_steps and (not isinstance(t.profile_steps, list) or len(t.profile_steps) != 2 or not all(isinstance(s, int) for s in t.profile_steps)
                            or not 0 <= t.profile_steps[0] < t.profile_steps[1]):
        raise ConfigError("train.profile_steps", f"expected [start, end] with 0 <= start < end, got {t.profile_steps}")
    tasks = cfg.run.eval_tasks
    if not (isinstance(tasks, str) or (isinstance(tasks, list) and all(isinstance(x, str) and x for x in tasks))):
        raise ConfigError("run.eval_tasks", f"expected a list of task names or a comma-separated string, got {tasks!r}")
    if t.seq_len > m.max_seq_len:
        raise ConfigError("train.seq_len", f"{t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if t.batch_size % t.microbatches:
        raise ConfigError("train.microbatches", f"batch_size={t.batch_size} is not divisible by "
                                                f"microbatches={t.microbatches}")
    if not 0 <= cfg.optimizer.min_lr_ratio <= 1:
        raise ConfigError("optimizer.min_lr_ratio", f"must be in [0, 1], got {cfg.optimizer.min_lr_ratio}")
    if not 0 < t.spike_decay < 1:
        raise ConfigError("train.spike_decay", f"must be in (0, 1), got {t.spike_decay}")
    _validate_checkpoint(cfg)
    if not 0 < cfg.data.eval_fraction < 1:
        raise ConfigError("data.eval_fraction", f"must be in (0, 1), got {cfg.data.eval_fraction}")
    d = cfg.data
    if d.source not in DATA_SOURCES and not (d.source.startswith("seqio:") and len(d.source) > 6):
        raise ConfigError("data.source", f"{d.source!r} is not one of {', '.join(DATA_SOURCES)} or seqio:<task>")
    if d.source == "mixture" and not d.mixture:
        raise ConfigError("data.mixture", "data.source=mixture needs data.mixture: {name: {source, path, weight}}")
    jinja = d.chat_template == "tokenizer" or d.chat_template.endswith((".json", ".jinja"))  # data/chat_template.py
    if not jinja and d.chat_template.count("{content}") != 1:
        raise ConfigError("data.chat_template", f"must contain '{{content}}' exactly once, got {d.chat_template!r}")
    for axis in ("data", "stage", "fsdp", "sequence", "tensor", "expert"):
        for prefix, node in (("mesh", cfg.mesh), ("mesh.dcn", cfg.mesh.dcn)):
            size = getattr(node, axis)
            if size == 0 or size < -1:
                raise ConfigError(f"{prefix}.{axis}", f"must be a positive size or -1, got {size}")
    from maxmodel.parallel.rules import logical_rules
    logical_rules(cfg.mesh.rules, cfg.mesh.rule_overrides)  # names the unknown preset / logical axis / mesh axis
    if m.attention.global_every and not m.attention.sliding_window:
        raise ConfigError("model.attention.global_every", f"{m.attention.global_every} alternates local and global "
                                                          f"layers but model.attention.sliding_window is 0")
    if m.attention.global_every and m.moe.num_experts:
        raise ConfigError("model.attention.global_every", "alternating local/global attention is not supported "
                                                          "with MoE layers (model.moe.num_experts > 0)")
    _validate_attention_impl(cfg)
    if m.norm_plus_one and m.norm != "rmsnorm":
        raise ConfigError("model.norm_plus_one", f"applies to rmsnorm only, but model.norm={m.norm!r}")
    _validate_objective(cfg)
    if t.objective != "causal_lm" and cfg.data.source.startswith("seqio:"):
        raise ConfigError("data.source", f"the seqio bridge yields decoder-only rows; train.objective="
                                         f"{t.objective} needs builtin or file sources")
    _validate_moe(cfg)
    _validate_seq2seq(cfg)


def _validate_attention_impl(cfg: Config) -> None:
    """An explicitly chosen attention kernel takes this model's masks (auto falls back to XLA instead)."""
    a = cfg.model.attention
    if a.impl in ("auto", "xla"):
        return
    from maxmodel.models.attention_kernels import KEY, choose_for_config
    choose_for_config(cfg)  # raises, naming the key, when the kernel cannot take these masks
    if cfg.mesh.sequence > 1:
        raise ConfigError(KEY, f"{a.impl} needs the whole sequence per device; mesh.sequence={cfg.mesh.sequence} "
                               f"uses context-parallel attention (model.attention.context_parallel)")


def _validate_objective(cfg: Config) -> None:
    """The objective exists (a module of maxmodel/finetune/objectives), trains this architecture (an encoder
    sees every token, so it cannot predict the next one) and reads this data format."""
    from maxmodel.finetune import objectives
    t = cfg.train
    if t.objective not in objectives.names():
        raise ConfigError("train.objective", f"{t.objective!r} is not one of {', '.join(objectives.names())}")
    obj = objectives.get(t.objective)
    if cfg.model.arch not in obj.archs:
        raise ConfigError("train.objective", f"{t.objective!r} trains model.arch={' or '.join(obj.archs)}, "
                                             f"not model.arch={cfg.model.arch!r}")
    if obj.formats is not None and cfg.data.source != "synthetic" and cfg.data.source != "mixture" \
            and cfg.data.format not in obj.formats:
        raise ConfigError("data.format", f"train.objective={t.objective} reads {' or '.join(obj.formats)} "
                                         f"records, not data.format={cfg.data.format!r}")
    from maxmodel.finetune.peft.config import validate_peft
    validate_peft(cfg)
    from maxmodel.finetune.preference_config import validate_preference
    validate_preference(cfg)


def _validate_seq2seq(cfg: Config) -> None:
    """What the encoder-decoder model does not support (yet)."""
    m = cfg.model
    if m.arch != "encoder_decoder":
        return
    for key in ("stage", "sequence"):  # the model has no pipeline or context-parallel schedule (yet)
        if getattr(cfg.mesh, key) > 1 or getattr(cfg.mesh.dcn, key) > 1:
            raise ConfigError(f"mesh.{key}", f"model.arch=encoder_decoder does not support mesh.{key} > 1")
    if m.moe.num_experts:
        raise ConfigError("model.moe.num_experts", "model.arch=encoder_decoder has dense layers only")
    for key in ("parallel_block", "post_norms"):
        if getattr(m, key):
            raise ConfigError(f"model.{key}", "model.arch=encoder_decoder has sequential blocks, one norm "
                                              "per sublayer")
    if m.attention.global_every:
        raise ConfigError("model.attention.global_every", "alternating local/global attention is not "
                                                          "supported with model.arch=encoder_decoder")
    if cfg.data.format == "chat":
        raise ConfigError("data.format", "seq2seq pairs come from text or prompt_completion records, not chat")


def _validate_moe(cfg: Config) -> None:
    m, moe = cfg.model, cfg.model.moe
    for key in ("num_experts", "first_dense_layers", "d_ff", "shared_experts", "capacity_factor",
                "aux_loss_weight", "z_loss_weight", "bias_update_rate"):
        if getattr(moe, key) < 0:
            raise ConfigError(f"model.moe.{key}", f"must be >= 0, got {getattr(moe, key)}")
    if not moe.num_experts:
        return
    if not 0 < moe.top_k <= moe.num_experts:
        raise ConfigError("model.moe.top_k", f"must be in [1, num_experts={moe.num_experts}], got {moe.top_k}")
    if moe.every < 1:
        raise ConfigError("model.moe.every", f"must be >= 1, got {moe.every}")
    if moe.first_dense_layers >= m.num_layers:
        raise ConfigError("model.moe.first_dense_layers", f"{moe.first_dense_layers} leaves no MoE layer of "
                                                          f"num_layers={m.num_layers}")
    if (m.num_layers - moe.first_dense_layers) % moe.every:
        raise ConfigError("model.moe.every", f"num_layers - first_dense_layers = "
                                             f"{m.num_layers - moe.first_dense_layers} is not a multiple of "
                                             f"every={moe.every}")
    if m.parallel_block:
        raise ConfigError("model.parallel_block", "is not supported with MoE layers (model.moe.num_experts > 0)")
    _validate_moe_impl(cfg)


def _validate_moe_impl(cfg: Config) -> None:
    """megablox (a TPU Pallas kernel) multiplies dropless groups of float32 / bfloat16 rows, in tiles that
    split dimensions at TPU vector-tile boundaries; mesh.check_layout refuses it inside pipeline stages."""
    moe = cfg.model.moe
    for key, multiple in (("tile_rows", 16), ("tile_embed", 128), ("tile_mlp", 128)):
        tile = getattr(moe, key)
        if tile <= 0 or tile % multiple:
            raise ConfigError(f"model.moe.{key}", f"must be a positive multiple of {multiple} (TPU vector "
                                                  f"tiles), got {tile}")
    if moe.impl != "megablox":
        return
    if moe.capacity_factor > 0:
        raise ConfigError("model.moe.impl", f"megablox multiplies dropless expert groups, but model.moe."
                                            f"capacity_factor={moe.capacity_factor} dispatches into fixed "
                                            f"slots (dense einsums): set capacity_factor=0 or impl=auto")
    if cfg.train.dtype not in ("float32", "bfloat16"):
        raise ConfigError("model.moe.impl", f"megablox multiplies float32 or bfloat16, not train.dtype="
                                            f"{cfg.train.dtype}: use impl=ragged_dot")


def _validate_checkpoint(cfg: Config) -> None:
    c = cfg.checkpoint
    if c.local_dir and not c.local_every_steps:
        raise ConfigError("checkpoint.local_every_steps", "must be > 0 when checkpoint.local_dir is set")
    if c.local_every_steps and not c.local_dir:
        raise ConfigError("checkpoint.local_dir", f"is empty but checkpoint.local_every_steps="
                                                  f"{c.local_every_steps}; name a local directory")
    if c.local_dir and c.dir and c.local_dir.rstrip("/") == c.dir.rstrip("/"):
        raise ConfigError("checkpoint.local_dir", f"must differ from checkpoint.dir ({c.dir})")
