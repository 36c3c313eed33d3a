"""The typed config schema: one dataclass per section, key names as in DESIGN.md.

Defaults here are the values of `configs/base.yaml`; YAML files and `key=value` overrides replace them.
Derived values (head_dim, d_ff, ...) are filled in by `derive.py`, checks live in `validate.py`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RopeScaling:
    """LLaMA 3 style frequency scaling; factor 1.0 disables it."""
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192


@dataclass
class AttentionConfig:
    context_parallel: str = "allgather"   # allgather | ring (used when mesh.sequence > 1)
    sliding_window: int = 0               # 0 = full causal attention
    logit_softcap: float = 0.0            # 0 = off (Gemma 2 uses 50)
    qkv_bias: bool = False
    global_every: int = 0                 # > 0: only every N-th layer attends globally, the rest use sliding_window (Gemma 2: 2)
    query_pre_attn_scalar: float = 0.0    # queries scaled by this ** -0.5; 0 = head_dim (Gemma 2 sets it apart)
    impl: str = "auto"                    # auto | xla | splash (TPU) | cudnn | flash (GPU); models/attention_kernels.py
    block_q: int = 512                    # splash / flash query block (clipped to the sequence length)
    block_kv: int = 512                   # splash / flash key-value block


@dataclass
class MoEConfig:
    num_experts: int = 0                  # 0 = dense model
    top_k: int = 2
    every: int = 1
    first_dense_layers: int = 0
    d_ff: int = 0                         # 0 = model.d_ff
    shared_experts: int = 0
    capacity_factor: float = 0.0          # 0 = dropless
    router: str = "softmax"               # softmax | sigmoid
    renormalize: bool = True
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    bias_balancing: bool = False          # DeepSeek-V3 aux-loss-free balancing (a per-expert routing bias)
    bias_update_rate: float = 0.001       # the bias moves by this much per step, towards the mean load
    impl: str = "auto"                    # dropless grouped matmul: auto | ragged_dot | megablox (TPU Pallas)
    exchange: str = "auto"                # dropless tokens over `expert`: auto | padded | ragged (token_exchange.py)
    tile_rows: int = 512                  # megablox tiles, each clipped to its dimension (MaxText's
    tile_embed: int = 1024                # tile_batch_seq / tile_embed_dim / tile_mlp_dim), for bf16:
    tile_mlp: int = 1024                  # float32 halves embed / mlp (parallel/grouped_matmul.py)


@dataclass
class ModelConfig:
    name: str = "tiny"
    arch: str = "decoder"                 # decoder | encoder (BERT) | encoder_decoder (the original Transformer)
    vocab_size: int = 1024
    d_model: int = 256
    num_layers: int = 4
    num_encoder_layers: int = 0           # arch=encoder_decoder: encoder depth (0 = num_layers); num_layers = decoder
    num_heads: int = 4
    num_kv_heads: int = 0                 # 0 = num_heads (MHA); 1 = MQA
    head_dim: int = 0                     # 0 = d_model // num_heads
    d_ff: int = 0                         # 0 = d_ff_multiplier * d_model (rounded to d_ff_multiple_of)
    d_ff_multiplier: float = 8 / 3
    d_ff_multiple_of: int = 64
    activation: str = "swiglu"            # swiglu | geglu | gelu (tanh approximation) | gelu_exact (erf) | relu
    norm: str = "rmsnorm"                 # rmsnorm | layernorm
    norm_eps: float = 1e-5
    norm_position: str = "pre"            # pre: x + f(norm(x)) | post (BERT, original Transformer): norm(x + f(x))
    positional: str = "rope"              # rope | learned | sinusoidal | none
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_embeddings: bool = False
    token_types: int = 0                  # encoder: token-type (segment) embeddings, BERT: 2; 0 = none
    max_seq_len: int = 2048
    use_bias: bool = False
    parallel_block: bool = False          # PaLM: x + attn(norm(x)) + mlp(norm(x))
    embed_scale: bool = False             # Gemma: multiply embeddings by sqrt(d_model)
    final_logit_softcap: float = 0.0
    norm_plus_one: bool = False           # Gemma: RMSNorm multiplies by (1 + scale), scale starting at 0
    post_norms: bool = False              # Gemma 2: also normalise the attention and MLP outputs before the residual add
    init_std: float = 0.02
    score_head: bool = False              # a [d_model] -> 1 head beside the LM head (reward models; on with train.objective=reward)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class MeshAxes:
    data: int = 1
    stage: int = 1
    fsdp: int = 1
    sequence: int = 1
    tensor: int = 1
    expert: int = 1


@dataclass
class MeshConfig(MeshAxes):
    """Within-slice (ICI) sizes; `dcn` holds the across-slice sizes. -1 fills the remainder."""
    data: int = -1
    # across slices the data axis fills the slices by default (MaxText's dcn_data_parallelism: -1): data
    # parallelism needs the least bandwidth, and a multi-slice launch then runs without mesh arguments
    dcn: MeshAxes = field(default_factory=lambda: MeshAxes(data=-1))
    rules: str = "auto"                   # a preset from maxmodel/parallel/rules.py; auto = pipeline if stage > 1
    rule_overrides: dict[str, Any] = field(default_factory=dict)  # logical name -> mesh axis / list / null
    zero1: bool = False                   # also shard optimizer state over `data` (ZeRO stage 1)


@dataclass
class PipelineConfig:
    """Pipeline schedule over the `stage` mesh axis (used when mesh.stage > 1)."""
    microbatches: int = 0                 # 0 = as many as stages; the bubble is (S-1)/(M·R+S-1)
    repeats: int = 1                      # 1 = GPipe; > 1 = circular (interleaved) with R virtual stages per device
    # gpipe (circular when repeats > 1) | circular | 1f1b | interleaved_1f1b (repeats > 1): the 1F1B ones run
    # each microbatch's backward as soon as it can, with explicit per-stage vjp steps (parallel/pipeline_1f1b.py);
    # zero_bubble: 1F1B with each backward split into input and weight steps, weight steps in the bubbles
    schedule: str = "gpipe"


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16                  # global sequences per step
    seq_len: int = 128
    microbatches: int = 1                 # gradient accumulation
    seed: int = 0
    dtype: str = "float32"                # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"                   # none | full | save_dots | save_dot_except_mlp | save_qkv_proj | qkv_proj_offloaded | save_dots_offloaded (models/remat.py)
    scan_layers: bool = True
    loss_chunk: int = 0                   # > 0: head + cross-entropy fused over chunks of this many positions
    profile_steps: Any = field(default_factory=list)  # [start, end]: jax.profiler trace into <run dir>/profile
    z_loss: float = 0.0
    objective: str = "causal_lm"          # a module of maxmodel/finetune/objectives: causal_lm | masked_lm | prefix_lm | seq2seq | sft | reward | dpo | ipo | orpo | simpo | kto
    on_nonfinite: str = "skip"            # non-finite loss/grads: skip the update (counted) | stop with a checkpoint
    spike_sigma: float = 0.0              # > 0: skip updates whose loss exceeds the running mean by this many std
    spike_warmup: int = 20                # losses averaged before the spike detector may skip anything
    spike_decay: float = 0.99             # running mean/variance decay (about 1/(1-decay) steps of memory)
    qat: str = "none"                     # none | int8 | int4: fake-quantized projection weights, straight-through


@dataclass
class OptimizerConfig:
    name: str = "adamw"                   # adamw | adam | sgd | adafactor | lion
    lr: float = 3e-3
    schedule: str = "cosine"              # cosine | linear | wsd | constant
    warmup_steps: int = 20
    decay_steps: int = 0                  # 0 = train.steps
    decay_fraction: float = 0.2           # wsd: fraction of steps spent decaying
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0                # 0 = no clipping


@dataclass
class DataConfig:
    source: str = "builtin"               # builtin | synthetic | jsonl | text | parquet | arrayrecord | seqio:<task> | mixture
    path: Any = None                      # file, glob or list
    text_field: str = "text"
    tokenizer: str = "spm"                # spm (trained on the data, cached) | bytes | path to a tokenizer file
    on_bad_record: str = "error"          # error | skip
    eval_fraction: float = 0.05           # documents held out when eval_path is not set
    eval_path: Any = None                 # held-out data of the same source type (file, glob, list, directory)
    shuffle: bool = True
    format: str = "text"                  # text | prompt_completion | chat (supervised: loss on completions only) | preference
    # a simple template (text before {content} never counts in the loss), or the model's own Jinja template:
    # `tokenizer` (the tokenizer_config.json beside data.tokenizer), a tokenizer_config.json, or a .jinja file
    chat_template: str = "<|{role}|>\n{content}<|end|>\n"
    packing: str = "concat"               # concat | first_fit | none
    mixture: dict[str, Any] = field(default_factory=dict)  # name -> {source, path, weight, text_field, format, eval_path, task}
    workers: int = 0                      # grain worker processes (0 = background threads in the trainer)
    prefetch: int = 4                     # batches prefetched (per worker when workers > 0)
    seqio_module: str = "maxmodel.data.seqio_tasks"  # imported to register seqio tasks for source=seqio:<task>


@dataclass
class CheckpointConfig:
    dir: str = ""                         # "" = <run dir>/checkpoints; local path or gs://bucket/path
    every_steps: int = 100                # 0 = no step-based saves
    every_minutes: float = 0.0            # 0 = no time-based saves
    keep: int = 2                         # latest checkpoints kept
    keep_every: int = 0                   # > 0: steps that are multiples of this are kept for good
    enabled: bool = True
    async_: bool = True                   # YAML key `async` (a Python keyword)
    local_dir: str = ""                   # emergency checkpoints on a fast local disk ("" = off)
    local_every_steps: int = 0            # how often to save there (needs local_dir)
    local_keep: int = 2


@dataclass
class InitConfig:
    from_: str = ""                       # YAML key `from`: a `maxmodel export` directory to start a new run from


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: which small set of parameters trains while the base stays frozen."""
    method: str = "none"                  # none (train everything) | lora | qlora | prompt | adapter
    rank: int = 8                         # LoRA rank r
    alpha: float = 16.0                   # LoRA scale alpha / r (alpha / sqrt(r) with rslora)
    rslora: bool = False                  # rank-stabilised scaling (Kalajievo 2023)
    dropout: float = 0.0                  # LoRA dropout on the adapter's input, in training only (0 = off)
    targets: Any = field(default_factory=lambda: ["q", "k", "v", "o"])  # q k v o gate up down (or all); expert_gate/up/down (or experts)
    quant: str = "nf4"                    # qlora: the frozen base as nf4 (4-bit, blockwise scales) | int8 (per channel)
    block_size: int = 64                  # qlora nf4: weights per absmax scale
    num_virtual_tokens: int = 8           # prompt: trainable virtual-token embeddings leading every document piece
    num_prompts: int = 1                  # prompt: tables (tasks); data.mixture.<name>.task picks a component's
    adapter_dim: int = 16                 # adapter: Houlsby bottleneck width (after attention and after the MLP)


@dataclass
class RLConfig:
    """Online RL (train.objective=grpo | ppo): rollouts from the generation engine on the training mesh, with
    the policy's current weights, every step. train.batch_size counts completions: batch_size / group_size
    prompts per step, each row one prompt + completion padded to train.seq_len."""
    group_size: int = 4                   # G completions per prompt (GRPO's group)
    max_new_tokens: int = 16              # completion budget (prompt + completion <= train.seq_len + 1)
    temperature: float = 1.0              # rollout sampling; log-probs are the raw model's either way
    top_p: float = 1.0
    top_k: int = 0
    stop: Any = field(default_factory=list)  # stop strings ending a completion early (EOS always does)
    rewards: Any = field(default_factory=list)  # [{fn: package.module.function, weight: 1.0}, ...]
    reward_model: str = ""                # a reward model directory scoring completions (beside or instead of rewards)
    beta: float = 0.04                    # KL-to-reference coefficient (0: no reference model is run)
    kl_estimator: str = "k3"              # k1 (log ratio) | k3 (Schulman's unbiased, non-negative)
    epsilon: float = 0.2                  # ratio clip below (1 - epsilon)
    epsilon_high: float = 0.0             # ratio clip above (1 + epsilon_high); 0 = epsilon (DAPO raises it)
    loss_agg: str = "grpo"                # grpo (per-sequence mean, then mean) | dr_grpo (sum / G*max_new_tokens) | dapo (token mean)
    scale_rewards: bool = True            # divide advantages by the group's reward std (Dr.GRPO: false)
    gamma: float = 1.0                    # ppo: discount over completion tokens
    gae_lambda: float = 0.95              # ppo: GAE's bias / variance trade-off
    value_coef: float = 0.1               # ppo: weight of the value loss
    value_clip: float = 0.2               # ppo: old value +- this bounds the clipped value prediction


@dataclass
class DistillConfig:
    """Distillation from a teacher model (train.objective=distill | gkd): any maxmodel model directory or run
    with the student's tokenizer (same vocab_size), of any size; it runs on the student's mesh."""
    teacher: str = ""                     # a model or run directory
    temperature: float = 2.0              # distill: both distributions softened by T; the KD term scaled by T^2
    alpha: float = 0.5                    # distill: weight of the KD term (1 - alpha: the hard-label loss)
    beta: float = 1.0                     # gkd: generalized JSD; 0 = forward KL(teacher||student), 1 = reverse KL


@dataclass
class DpoConfig:
    """Preference objectives (train.objective = reward | dpo | ipo | orpo | simpo | kto) and their data
    (data.format=preference): see maxmodel/finetune/preference.py."""
    beta: float = 0.1                     # dpo / kto: 1/beta weighs the KL anchor; ipo: tau; simpo: reward scale
    label_smoothing: float = 0.0          # dpo / simpo: the assumed chance a label is flipped (conservative DPO)
    orpo_lambda: float = 0.1              # orpo: weight of the odds-ratio term beside the chosen NLL
    simpo_gamma: float = 0.5              # simpo: target reward margin
    kto_desirable_weight: float = 1.0     # kto: lambda_D
    kto_undesirable_weight: float = 1.0   # kto: lambda_U
    reference: str = "live"               # dpo / ipo / kto: live (a forward per step) | precomputed (one pass, then freed)
    max_docs: int = 16                    # documents per packed row: the width of the per-document sums (even)


@dataclass
class RunConfig:
    name: str = "default"
    output_dir: str = "runs"
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    # every eval_every steps also these evaluation tasks (maxmodel eval's names: perplexity, choice:FILE, an
    # lm-eval task, ...; a list or a comma-separated string); their metrics go to metrics.jsonl as eval/<task>/<metric>
    eval_tasks: Any = field(default_factory=list)
    eval_include_path: str = ""           # a directory of task YAMLs for eval_tasks (lm-eval's or native ones)
    eval_limit: int = 0                   # > 0: only the first N documents of each task
    cpu_devices: int = 8
    sample_prompt: str = "The "
    sample_tokens: int = 48
    progress: bool = True
    compile_cache_dir: str = ""           # persistent XLA compilation cache ("" = off): restarts skip compiling


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    init: InitConfig = field(default_factory=InitConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    run: RunConfig = field(default_factory=RunConfig)


# Field names that differ from their YAML key because the key is a Python keyword.
YAML_TO_FIELD = {"async": "async_", "from": "from_"}
FIELD_TO_YAML = {v: k for k, v in YAML_TO_FIELD.items()}


def run_dir_of(cfg: Config):
    """Where a run writes its config, metrics and checkpoints: run.output_dir / run.name."""
    from pathlib import Path
    return Path(cfg.run.output_dir) / cfg.run.name


def to_dict(obj) -> dict:
    """A dataclass tree as plain dicts with YAML key names."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[FIELD_TO_YAML.get(f.name, f.name)] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out
