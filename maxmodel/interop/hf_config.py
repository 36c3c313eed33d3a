"""Hugging Face `config.json` <-> maxmodel `model.*`, for GPT-2, LLaMA 2/3, Mistral, Mixtral, Qwen 2, Gemma,
Gemma 2 and BERT.

Anything the model cannot express (an unknown rope type, attention biases on LLaMA, ...) is an error naming
the config.json key, never a silent approximation.
"""
from __future__ import annotations

from maxmodel.config.errors import ConfigError
from maxmodel.config.schema import ModelConfig

FAMILIES = ("gpt2", "llama", "mistral", "mixtral", "qwen2", "gemma", "gemma2", "bert")
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "mixtral": "MixtralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "bert": "BertForMaskedLM"}
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _bad(key: str, value, why: str) -> ConfigError:
    return ConfigError(f"config.json:{key}", f"{value!r}: {why}")


def _rope(hf: dict, m: ModelConfig) -> None:
    """rope_theta and LLaMA 3 scaling; transformers 5 keeps both in `rope_parameters`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    m.rope_theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "llama3":
        s = m.rope_scaling
        s.factor = float(params["factor"])
        s.low_freq_factor = float(params["low_freq_factor"])
        s.high_freq_factor = float(params["high_freq_factor"])
        s.original_max_len = int(params["original_max_position_embeddings"])
    elif kind != "default":
        raise _bad("rope_parameters.rope_type", kind, "only default and llama3 RoPE are supported")


def from_hf(hf: dict) -> tuple[ModelConfig, str]:
    """(model config, family) from a parsed config.json."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise _bad("model_type", family, f"supported: {', '.join(FAMILIES)}")
    m = ModelConfig(name=f"hf-{family}")
    if family == "bert":
        return _bert_from_hf(hf, m), family
    if family == "gpt2":
        m.vocab_size, m.d_model, m.num_layers = hf["vocab_size"], hf["n_embd"], hf["n_layer"]
        m.num_heads = m.num_kv_heads = hf["n_head"]
        m.head_dim = m.d_model // m.num_heads
        m.d_ff = hf.get("n_inner") or 4 * m.d_model
        m.max_seq_len = hf["n_positions"]
        m.norm_eps = hf.get("layer_norm_epsilon", 1e-5)
        if hf.get("activation_function", "gelu_new") not in GELU_TANH:
            raise _bad("activation_function", hf.get("activation_function"), f"supported: {', '.join(GELU_TANH)}")
        m.activation, m.norm, m.positional, m.use_bias = "gelu", "layernorm", "learned", True
        m.tie_embeddings = hf.get("tie_word_embeddings", True)
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(key):
                raise _bad(key, hf[key], "not supported")
        return m, family
    m.vocab_size, m.d_model, m.num_layers = hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"]
    m.num_heads = hf["num_attention_heads"]
    m.num_kv_heads = hf.get("num_key_value_heads") or m.num_heads
    m.head_dim = hf.get("head_dim") or m.d_model // m.num_heads
    m.d_ff = hf["intermediate_size"]
    m.max_seq_len = hf.get("max_position_embeddings", 2048)
    m.norm_eps = hf.get("rms_norm_eps", 1e-6)
    m.norm, m.positional = "rmsnorm", "rope"
    m.tie_embeddings = hf.get("tie_word_embeddings", family in ("gemma", "gemma2"))
    _rope(hf, m)
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if family in ("gemma", "gemma2"):
        if act not in GELU_TANH:
            raise _bad("hidden_activation", act, f"supported: {', '.join(GELU_TANH)}")
        m.activation, m.embed_scale, m.norm_plus_one = "geglu", True, True
    elif act != "silu":
        raise _bad("hidden_act", act, "supported: silu")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise _bad("attention_bias", True, "biases on LLaMA-style projections are not supported")
    m.attention.qkv_bias = family == "qwen2"
    window = hf.get("sliding_window") or 0
    if family == "qwen2" and not hf.get("use_sliding_window"):
        window = 0
    if family in ("mistral", "mixtral"):
        m.attention.sliding_window = window
    if family == "mixtral":
        _moe_from_hf(hf, m)
    if family == "gemma2":
        m.post_norms = True
        m.attention.sliding_window = window
        m.attention.global_every = 2
        layer_types = hf.get("layer_types")
        expected = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(m.num_layers)]
        if layer_types and list(layer_types) != expected:
            raise _bad("layer_types", layer_types, "only Gemma 2's alternating local/global pattern is supported")
        m.attention.query_pre_attn_scalar = float(hf.get("query_pre_attn_scalar", m.head_dim))
        m.attention.logit_softcap = float(hf.get("attn_logit_softcapping") or 0.0)
        m.final_logit_softcap = float(hf.get("final_logit_softcapping") or 0.0)
    elif family == "qwen2" and window:
        raise _bad("use_sliding_window", True, "Qwen 2's layer-dependent sliding window is not supported")
    return m, family


def _bert_from_hf(hf: dict, m: ModelConfig) -> ModelConfig:
    """BERT: post-norm LayerNorm encoder, learned absolute positions and token types, exact GELU, tied MLM head."""
    m.arch, m.norm, m.norm_position, m.positional, m.use_bias = "encoder", "layernorm", "post", "learned", True
    m.vocab_size, m.d_model, m.num_layers = hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"]
    m.num_heads = m.num_kv_heads = hf["num_attention_heads"]
    m.head_dim = m.d_model // m.num_heads
    m.d_ff, m.max_seq_len = hf["intermediate_size"], hf.get("max_position_embeddings", 512)
    m.token_types, m.norm_eps = hf.get("type_vocab_size", 2), hf.get("layer_norm_eps", 1e-12)
    m.init_std = hf.get("initializer_range", 0.02)
    m.activation, m.tie_embeddings = "gelu_exact", True
    checks = {"hidden_act": (hf.get("hidden_act", "gelu"), "gelu", "only the exact (erf) GELU"),
              "position_embedding_type": (hf.get("position_embedding_type", "absolute"), "absolute",
                                          "only absolute learned positions"),
              "tie_word_embeddings": (hf.get("tie_word_embeddings", True), True,
                                      "the MLM decoder must be the word embeddings"),
              "is_decoder": (hf.get("is_decoder", False), False, "a decoder BERT is not supported"),
              "add_cross_attention": (hf.get("add_cross_attention", False), False, "not supported")}
    for key, (value, wanted, why) in checks.items():
        if value != wanted:
            raise _bad(key, value, why)
    return m


def _bert_to_hf(m: ModelConfig, base: dict) -> dict:
    if m.num_kv_heads != m.num_heads or m.head_dim * m.num_heads != m.d_model:
        raise ConfigError("model.num_kv_heads", "BERT has multi-head attention with head_dim = d_model / num_heads")
    if m.activation != "gelu_exact" or m.norm != "layernorm" or m.norm_position != "post" or not m.use_bias:
        raise ConfigError("model.activation", "BERT needs gelu_exact, layernorm, norm_position=post and use_bias")
    if m.positional != "learned" or not m.tie_embeddings or not m.token_types:
        raise ConfigError("model.positional", "BERT needs learned positions, token types and tied embeddings")
    return {**base, "hidden_size": m.d_model, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
            "intermediate_size": m.d_ff, "hidden_act": "gelu", "max_position_embeddings": m.max_seq_len,
            "type_vocab_size": m.token_types, "layer_norm_eps": m.norm_eps, "initializer_range": m.init_std,
            "position_embedding_type": "absolute"}


def _moe_from_hf(hf: dict, m: ModelConfig) -> None:
    """Mixtral: every layer is a dropless top-k MoE with a softmax router, its top-k weights renormalised."""
    moe = m.moe
    moe.num_experts, moe.top_k = hf["num_local_experts"], hf["num_experts_per_tok"]
    moe.d_ff = m.d_ff
    moe.every, moe.first_dense_layers, moe.capacity_factor = 1, 0, 0.0
    moe.router, moe.renormalize = "softmax", True
    # Training only (logits do not depend on them). transformers' load-balancing loss is top_k times ours per
    # layer and pools the layers where ours sums them; it has no router z-loss.
    moe.aux_loss_weight = float(hf.get("router_aux_loss_coef", 0.001)) * moe.top_k / m.num_layers
    moe.z_loss_weight = 0.0


def _moe_to_hf(m: ModelConfig) -> dict:
    moe = m.moe
    unsupported = {"router": moe.router != "softmax", "renormalize": not moe.renormalize, "every": moe.every != 1,
                   "first_dense_layers": moe.first_dense_layers != 0, "shared_experts": moe.shared_experts != 0,
                   "bias_balancing": moe.bias_balancing}
    for key, bad in unsupported.items():
        if bad:
            raise ConfigError(f"model.moe.{key}", f"{getattr(moe, key)!r}: Mixtral has a softmax router with "
                                                  "renormalised top-k, MoE in every layer, no shared experts and "
                                                  "no routing bias")
    dense_only = {"activation": m.activation != "swiglu", "norm": m.norm != "rmsnorm",
                  "attention.qkv_bias": m.attention.qkv_bias, "post_norms": m.post_norms,
                  "norm_plus_one": m.norm_plus_one, "embed_scale": m.embed_scale,
                  "attention.logit_softcap": bool(m.attention.logit_softcap),
                  "final_logit_softcap": bool(m.final_logit_softcap)}
    for key, bad in dense_only.items():
        if bad:
            raise ConfigError(f"model.{key}", "Mixtral is a Mistral-style model (swiglu, rmsnorm, no qkv biases, "
                                              "post-norms, embedding scale or softcaps)")
    # capacity_factor > 0 is a dispatch choice, not a weight: transformers runs the same experts dropless.
    return {"num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
            "router_aux_loss_coef": moe.aux_loss_weight * m.num_layers / moe.top_k, "router_jitter_noise": 0.0}


def guess_family(m: ModelConfig) -> str:
    if m.arch != "decoder":
        if m.arch == "encoder":
            return "bert"
        raise ConfigError("model.arch", f"{m.arch!r}: no Hugging Face conversion (decoders and BERT only)")
    if m.moe.num_experts:
        return "mixtral"
    if m.positional == "learned" and m.norm == "layernorm":
        return "gpt2"
    if m.post_norms:
        return "gemma2"
    if m.norm_plus_one:
        return "gemma"
    if m.attention.qkv_bias:
        return "qwen2"
    return "mistral" if m.attention.sliding_window else "llama"


def to_hf(m: ModelConfig, family: str) -> dict:
    """config.json for `family`; raises when the model uses a feature that family cannot hold."""
    if family not in FAMILIES:
        raise ConfigError("--model-type", f"{family!r} is not one of {', '.join(FAMILIES)}")
    if family != guess_family(m):
        raise ConfigError("--model-type", f"this model's features are those of {guess_family(m)!r}, not {family!r}")
    base = {"model_type": family, "architectures": [ARCHITECTURES[family]], "vocab_size": m.vocab_size,
            "tie_word_embeddings": m.tie_embeddings, "torch_dtype": "float32"}
    if family == "bert":
        return _bert_to_hf(m, base)
    if family == "gpt2":
        if m.activation != "gelu" or not m.use_bias or m.num_kv_heads != m.num_heads:
            raise ConfigError("model.activation", "GPT-2 needs gelu, use_bias and multi-head attention")
        return {**base, "n_embd": m.d_model, "n_layer": m.num_layers, "n_head": m.num_heads, "n_inner": m.d_ff,
                "n_positions": m.max_seq_len, "layer_norm_epsilon": m.norm_eps, "activation_function": "gelu_new"}
    if m.use_bias or m.parallel_block or m.positional != "rope":
        raise ConfigError("model.use_bias", f"{family} needs rope, no projection biases and sequential blocks")
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling.factor > 1:
        s = m.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": m.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_len}
    out = {**base, "hidden_size": m.d_model, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
           "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim, "intermediate_size": m.d_ff,
           "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
           "rope_parameters": rope}
    if family in ("gemma", "gemma2"):
        out["hidden_activation"] = "gelu_pytorch_tanh"
    else:
        out["hidden_act"] = "silu"
    if family == "mistral":
        out["sliding_window"] = m.attention.sliding_window
    if family == "mixtral":
        if m.moe.d_ff != m.d_ff:
            out["intermediate_size"] = m.moe.d_ff  # the experts' width; a dense d_ff is unused with every=1
        out.update(sliding_window=m.attention.sliding_window or None, **_moe_to_hf(m))
    if family == "gemma2":
        a = m.attention
        if a.global_every != 2 or a.query_pre_attn_scalar != int(a.query_pre_attn_scalar):
            raise ConfigError("model.attention.global_every", "Gemma 2 alternates local/global layers "
                                                              "(global_every=2) with an integer query_pre_attn_scalar")
        out.update(sliding_window=a.sliding_window, query_pre_attn_scalar=int(a.query_pre_attn_scalar or m.head_dim),
                   attn_logit_softcapping=a.logit_softcap or None,
                   final_logit_softcapping=m.final_logit_softcap or None,
                   layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention"
                                for i in range(m.num_layers)])
    return out
