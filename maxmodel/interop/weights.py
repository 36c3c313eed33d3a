"""Which Hugging Face tensors make which maxmodel parameter, and how (transposes, head reshapes, fused QKV).

A rule is (our parameter names, HF tensor names, to_ours, to_hf): to_ours maps the HF arrays to ours and
to_hf maps back exactly (transposes and reshapes, so a round trip is bit-identical). Per-layer rules use HF
names with `{i}` and our names relative to one block. A rule with `part` fills one slice of our parameter
(one expert of a stacked [E, ...] MoE weight), so a Hub Mixtral checkpoint streams one expert matrix at a time.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from maxmodel.config.schema import ModelConfig

# Buffers some checkpoints carry that are not weights (GPT-2's causal masks, older LLaMAs' RoPE frequencies):
# no rule reads them and from-hf does not report them as left out.
BUFFERS = re.compile(r"(\.attn\.(masked_)?bias|rotary_emb\.inv_freq)$")


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]          # dotted paths: "attn.wq" (in a block) or "embed.table" (top level)
    hf: tuple[str, ...]            # "model.layers.{i}.self_attn.q_proj.weight"
    to_ours: Callable[..., tuple]
    to_hf: Callable[..., tuple]
    part: int | None = None        # index along our parameter's first axis (the expert), or the whole
    # Not in the HF model class (BERT's pooler in a BertForMaskedLM): read when the checkpoint has it, else
    # made by `init(shape)`; never written back.
    init: Callable[[tuple[int, ...]], np.ndarray] | None = None


def _same(name_ours: str, name_hf: str) -> Rule:
    return Rule((name_ours,), (name_hf,), lambda a: (a,), lambda a: (a,))


def _transposed(name_ours: str, name_hf: str) -> Rule:
    """torch Linear stores [out, in]; we store [in, out]."""
    return Rule((name_ours,), (name_hf,), lambda a: (a.T,), lambda a: (np.ascontiguousarray(a.T),))


def _heads_in(name_ours: str, name_hf: str, heads: int, head_dim: int) -> Rule:
    """q/k/v projection: HF [heads*head_dim, d] -> ours [d, heads, head_dim]."""
    return Rule((name_ours,), (name_hf,), lambda a: (a.T.reshape(a.shape[1], heads, head_dim),),
                lambda a: (np.ascontiguousarray(a.reshape(a.shape[0], -1).T),))


def _heads_bias(name_ours: str, name_hf: str, heads: int, head_dim: int) -> Rule:
    return Rule((name_ours,), (name_hf,), lambda a: (a.reshape(heads, head_dim),), lambda a: (a.reshape(-1),))


def _heads_out(name_ours: str, name_hf: str, heads: int, head_dim: int) -> Rule:
    """o projection: HF [d, heads*head_dim] -> ours [heads, head_dim, d]."""
    return Rule((name_ours,), (name_hf,), lambda a: (a.T.reshape(heads, head_dim, a.shape[0]),),
                lambda a: (np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T),))


def moe_rules(m: ModelConfig, p: str, fused: bool) -> list[Rule]:
    """Mixtral's experts. Ours: router [d, E], expert_wg (gate) and expert_wi (up) [E, d, f], expert_wo
    [E, f, d]. The Hub layout (what save_pretrained writes) has per-expert torch Linears under
    block_sparse_moe: w1 = gate, w3 = up [f, d], w2 = down [d, f]. transformers 5 in memory (and
    save_pretrained(save_original_format=False)) fuses them: mlp.experts.gate_up_proj [E, 2f, d] (gate
    rows first), mlp.experts.down_proj [E, d, f]."""
    if not fused:
        q = p + "block_sparse_moe."
        rules = [_transposed("mlp.router", q + "gate.weight")]
        for j in range(m.moe.num_experts):
            rules += [replace(_transposed(ours, f"{q}experts.{j}.{w}.weight"), part=j)
                      for ours, w in (("mlp.expert_wg", "w1"), ("mlp.expert_wi", "w3"), ("mlp.expert_wo", "w2"))]
        return rules
    f = m.moe.d_ff

    def swap(a):  # [E, out, in] <-> [E, in, out]
        return np.ascontiguousarray(a.transpose(0, 2, 1))
    q = p + "mlp."
    return [_transposed("mlp.router", q + "gate.weight"),
            Rule(("mlp.expert_wg", "mlp.expert_wi"), (q + "experts.gate_up_proj",),
                 lambda a: (swap(a[:, :f]), swap(a[:, f:])), lambda g, u: (swap(np.concatenate([g, u], axis=2)),)),
            Rule(("mlp.expert_wo",), (q + "experts.down_proj",), lambda a: (swap(a),), lambda a: (swap(a),))]


def llama_rules(m: ModelConfig, family: str, fused_experts: bool = False) -> tuple[list[Rule], list[Rule]]:
    """(top-level rules, per-layer rules) for LLaMA, Mistral, Mixtral, Qwen 2, Gemma and Gemma 2."""
    h, kvh, hd = m.num_heads, m.num_kv_heads, m.head_dim
    p = "model.layers.{i}."
    top = [_same("embed.table", "model.embed_tokens.weight"), _same("final_norm.scale", "model.norm.weight")]
    if not m.tie_embeddings:
        top.append(_transposed("head", "lm_head.weight"))
    layer = [
        _same("attn_norm.scale", p + "input_layernorm.weight"),
        _heads_in("attn.wq", p + "self_attn.q_proj.weight", h, hd),
        _heads_in("attn.wk", p + "self_attn.k_proj.weight", kvh, hd),
        _heads_in("attn.wv", p + "self_attn.v_proj.weight", kvh, hd),
        _heads_out("attn.wo", p + "self_attn.o_proj.weight", h, hd),
    ]
    if family == "mixtral":
        layer += moe_rules(m, p, fused_experts)
    else:
        layer += [_transposed("mlp.wg", p + "mlp.gate_proj.weight"), _transposed("mlp.wi", p + "mlp.up_proj.weight"),
                  _transposed("mlp.wo", p + "mlp.down_proj.weight")]
    if m.attention.qkv_bias:
        layer += [_heads_bias("attn.q_bias", p + "self_attn.q_proj.bias", h, hd),
                  _heads_bias("attn.k_bias", p + "self_attn.k_proj.bias", kvh, hd),
                  _heads_bias("attn.v_bias", p + "self_attn.v_proj.bias", kvh, hd)]
    if family == "gemma2":
        layer += [_same("attn_post_norm.scale", p + "post_attention_layernorm.weight"),
                  _same("mlp_norm.scale", p + "pre_feedforward_layernorm.weight"),
                  _same("mlp_post_norm.scale", p + "post_feedforward_layernorm.weight")]
    else:
        layer.append(_same("mlp_norm.scale", p + "post_attention_layernorm.weight"))
    return top, layer


def gpt2_rules(m: ModelConfig) -> tuple[list[Rule], list[Rule]]:
    """GPT-2 uses Conv1D ([in, out], no transpose) and one fused c_attn for q, k, v."""
    h, hd, d = m.num_heads, m.head_dim, m.d_model
    p = "transformer.h.{i}."

    def split_qkv_w(a):
        return tuple(w.reshape(d, h, hd) for w in np.split(a, 3, axis=1))

    def split_qkv_b(a):
        return tuple(b.reshape(h, hd) for b in np.split(a, 3))

    top = [_same("embed.table", "transformer.wte.weight"), _same("embed.pos_table", "transformer.wpe.weight"),
           _same("final_norm.scale", "transformer.ln_f.weight"), _same("final_norm.bias", "transformer.ln_f.bias")]
    if not m.tie_embeddings:
        top.append(_transposed("head", "lm_head.weight"))
    layer = [
        _same("attn_norm.scale", p + "ln_1.weight"), _same("attn_norm.bias", p + "ln_1.bias"),
        Rule(("attn.wq", "attn.wk", "attn.wv"), (p + "attn.c_attn.weight",), split_qkv_w,
             lambda q, k, v: (np.concatenate([x.reshape(d, -1) for x in (q, k, v)], axis=1),)),
        Rule(("attn.q_bias", "attn.k_bias", "attn.v_bias"), (p + "attn.c_attn.bias",), split_qkv_b,
             lambda q, k, v: (np.concatenate([x.reshape(-1) for x in (q, k, v)]),)),
        Rule(("attn.wo",), (p + "attn.c_proj.weight",), lambda a: (a.reshape(h, hd, d),),
             lambda a: (a.reshape(h * hd, d),)),
        _same("attn.o_bias", p + "attn.c_proj.bias"),
        _same("mlp_norm.scale", p + "ln_2.weight"), _same("mlp_norm.bias", p + "ln_2.bias"),
        _same("mlp.wi", p + "mlp.c_fc.weight"), _same("mlp.in_bias", p + "mlp.c_fc.bias"),
        _same("mlp.wo", p + "mlp.c_proj.weight"), _same("mlp.out_bias", p + "mlp.c_proj.bias"),
    ]
    return top, layer


def bert_rules(m: ModelConfig) -> tuple[list[Rule], list[Rule]]:
    """BertForMaskedLM. Its decoder is the word embeddings (tied) and its bias `cls.predictions.bias`. The
    pooler is only in BertModel / BertForPreTraining checkpoints (those on the Hub have it): taken when present,
    else initialised as the model would be (normal(init_std) weight, zero bias)."""
    h, hd = m.num_heads, m.head_dim
    p, e = "bert.encoder.layer.{i}.", "bert.embeddings."
    rng = np.random.default_rng(0)
    pooler = [replace(_transposed("pooler", "bert.pooler.dense.weight"),
                      init=lambda shape: (m.init_std * rng.standard_normal(shape)).astype(np.float32)),
              replace(_same("pooler_bias", "bert.pooler.dense.bias"), init=lambda shape: np.zeros(shape, np.float32))]

    top = [_same("embed.table", e + "word_embeddings.weight"), _same("embed.pos_table", e + "position_embeddings.weight"),
           _same("type_table", e + "token_type_embeddings.weight"),
           _same("embed_norm.scale", e + "LayerNorm.weight"), _same("embed_norm.bias", e + "LayerNorm.bias"),
           _transposed("mlm_dense", "cls.predictions.transform.dense.weight"),
           _same("mlm_dense_bias", "cls.predictions.transform.dense.bias"),
           _same("mlm_norm.scale", "cls.predictions.transform.LayerNorm.weight"),
           _same("mlm_norm.bias", "cls.predictions.transform.LayerNorm.bias"),
           _same("mlm_bias", "cls.predictions.bias"), *pooler]
    layer = [
        _heads_in("attn.wq", p + "attention.self.query.weight", h, hd),
        _heads_bias("attn.q_bias", p + "attention.self.query.bias", h, hd),
        _heads_in("attn.wk", p + "attention.self.key.weight", h, hd),
        _heads_bias("attn.k_bias", p + "attention.self.key.bias", h, hd),
        _heads_in("attn.wv", p + "attention.self.value.weight", h, hd),
        _heads_bias("attn.v_bias", p + "attention.self.value.bias", h, hd),
        _heads_out("attn.wo", p + "attention.output.dense.weight", h, hd),
        _same("attn.o_bias", p + "attention.output.dense.bias"),
        _same("attn_norm.scale", p + "attention.output.LayerNorm.weight"),
        _same("attn_norm.bias", p + "attention.output.LayerNorm.bias"),
        _transposed("mlp.wi", p + "intermediate.dense.weight"), _same("mlp.in_bias", p + "intermediate.dense.bias"),
        _transposed("mlp.wo", p + "output.dense.weight"), _same("mlp.out_bias", p + "output.dense.bias"),
        _same("mlp_norm.scale", p + "output.LayerNorm.weight"), _same("mlp_norm.bias", p + "output.LayerNorm.bias"),
    ]
    return top, layer


def rules_for(m: ModelConfig, family: str, fused_experts: bool = False) -> tuple[list[Rule], list[Rule]]:
    """fused_experts: read/write Mixtral experts as transformers 5's fused tensors, not the Hub layout."""
    if family == "bert":
        return bert_rules(m)
    return gpt2_rules(m) if family == "gpt2" else llama_rules(m, family, fused_experts)
