"""The original Transformer (Vaswani et al. 2017): an encoder-decoder for sequence-to-sequence training.

Source and target share one token embedding (multiplied by sqrt(d_model) with model.embed_scale), which is
also the pre-softmax projection with model.tie_embeddings (paper section 3.4). Both sides are packed: the
encoder's segment k is the source of the decoder's segment k, so cross-attention looks only at equal segment
ids and a packed row holds several independent pairs. The encoder attends both ways within a source, the
decoder causally within a target.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from maxmodel.config.schema import Config, ModelConfig

from .attention import Attention, attention_mask, dot_product_attention
from .layers import MLP, Embed, make_norm
from .sharding import constrain, param
from .remat import POLICIES as REMAT_POLICIES
from .transformer import ACT, DTYPES, Block, Transformer, _stack

HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")


class CrossAttention(Attention):
    """Queries from the decoder, keys and values from the encoder output. Attention's parameters and
    logical axes; never causal, and no rotary (source and target positions are not comparable)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype=jnp.float32):
        super().__init__(cfg, rngs, param_dtype, causal=False)

    def __call__(self, x, memory, segment_ids, memory_segment_ids, positions, memory_positions):
        q = constrain(self._project(x, self.wq, self.q_bias), HEADS)
        k = constrain(self._project(memory, self.wk, self.k_bias), KV_HEADS)
        v = constrain(self._project(memory, self.wv, self.v_bias), KV_HEADS)
        scale_dim = self.cfg.attention.query_pre_attn_scalar
        if scale_dim:
            q = q * jnp.asarray(math.sqrt(self.cfg.head_dim / scale_dim), q.dtype)
        # A target token sees its own example's source only: equal segment ids (padding is segment 0).
        mask = attention_mask(segment_ids, memory_segment_ids, positions, memory_positions, causal=False)
        out = constrain(dot_product_attention(q, k, v, mask, self.cfg.attention.logit_softcap), HEADS)
        return self._output(out, x.dtype)


def encoder_block(cfg: ModelConfig, rngs: nnx.Rngs, param_dtype) -> Block:
    """The decoder-only model's block with bidirectional self-attention (within each packed source)."""
    return Block(cfg, rngs, param_dtype, causal=False)


class DecoderBlock(nnx.Module):
    """Causal self-attention, cross-attention over the encoder output, then the feed-forward network. Each
    sublayer is norm(x + f(x)) (post-norm, the paper's) or x + f(norm(x)) (pre-norm)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.post_norm = cfg.norm_position == "post"
        self.attn_norm = make_norm(cfg, param_dtype)
        self.attn = Attention(cfg, rngs, param_dtype, window=cfg.attention.sliding_window)
        self.cross_norm = make_norm(cfg, param_dtype)
        self.cross = CrossAttention(cfg, rngs, param_dtype)
        self.mlp_norm = make_norm(cfg, param_dtype)
        self.mlp = MLP(cfg, rngs, param_dtype)

    def _sublayer(self, x, norm, f):
        return constrain(norm(x + f(x)) if self.post_norm else x + f(norm(x)), ACT)

    def __call__(self, x, segment_ids, positions, memory, memory_segment_ids, memory_positions):
        x = self._sublayer(x, self.attn_norm, lambda h: self.attn(h, segment_ids, positions))
        x = self._sublayer(x, self.cross_norm, lambda h: self.cross(h, memory, segment_ids, memory_segment_ids,
                                                                    positions, memory_positions))
        return self._sublayer(x, self.mlp_norm, self.mlp)


def _defaults(tokens, segment_ids, positions):
    """One unpacked sequence per row when segment ids / positions are not given."""
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return segment_ids, positions


class EncoderDecoder(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        m = cfg.model
        self.cfg = cfg
        self.dtype = DTYPES[cfg.train.dtype]
        param_dtype = DTYPES[cfg.train.param_dtype]
        self.embed = Embed(m, rngs, param_dtype)  # shared by source and target (and the tied head)
        enc_layers = m.num_encoder_layers or m.num_layers
        if cfg.train.scan_layers:
            self.encoder_layers = _stack(lambda r: encoder_block(m, r, param_dtype), enc_layers, rngs)
            self.decoder_layers = _stack(lambda r: DecoderBlock(m, r, param_dtype), m.num_layers, rngs)
        else:
            self.encoder_layers = nnx.List([encoder_block(m, rngs, param_dtype) for _ in range(enc_layers)])
            self.decoder_layers = nnx.List([DecoderBlock(m, rngs, param_dtype) for _ in range(m.num_layers)])
        # Post-norm stacks end normalised already; pre-norm stacks need a final norm on each side.
        pre = m.norm_position == "pre"
        self.encoder_norm = make_norm(m, param_dtype) if pre else None
        self.decoder_norm = make_norm(m, param_dtype) if pre else None
        if not m.tie_embeddings:
            self.head = param(rngs, (m.d_model, m.vocab_size), ("embed", "vocab"), std=m.init_std,
                              dtype=param_dtype)

    # The output side is the decoder-only model's (same attribute names: embed, head, cfg, dtype).
    head_matrix = Transformer.head_matrix
    logits = Transformer.logits

    def _remat(self, fn):
        policy = self.cfg.train.remat
        if policy == "none":
            return fn
        return nnx.remat(fn, policy=REMAT_POLICIES[policy], prevent_cse=not self.cfg.train.scan_layers)

    def encode(self, tokens, segment_ids, positions):
        """The encoder output [B, S, d_model] for source tokens [B, S]."""
        x = self.embed(tokens, positions, self.dtype)
        run = self._remat(lambda block, x, seg, pos: block(x, seg, pos)[0])
        if self.cfg.train.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0, None, None), out_axes=nnx.Carry,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def body(x, block, seg, pos):
                return run(block, x, seg, pos)
            x = body(x, self.encoder_layers, segment_ids, positions)
        else:
            for block in self.encoder_layers:
                x = run(block, x, segment_ids, positions)
        return self.encoder_norm(x) if self.encoder_norm is not None else x

    def decode(self, tokens, segment_ids, positions, memory, memory_segment_ids, memory_positions):
        """The decoder's final hidden states [B, L, d_model] given the encoder output."""
        x = self.embed(tokens, positions, self.dtype)
        run = self._remat(lambda block, x, *args: block(x, *args))
        args = (segment_ids, positions, memory, memory_segment_ids, memory_positions)
        if self.cfg.train.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0) + (None,) * len(args), out_axes=nnx.Carry,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def body(x, block, *args):
                return run(block, x, *args)
            x = body(x, self.decoder_layers, *args)
        else:
            for block in self.decoder_layers:
                x = run(block, x, *args)
        return self.decoder_norm(x) if self.decoder_norm is not None else x

    def hidden(self, tokens, segment_ids, positions, encoder_inputs, encoder_segment_ids=None,
               encoder_positions=None):
        """Decoder hidden states [B, L, d_model] and (no MoE here) empty stats: the decoder-only interface
        plus the source side."""
        encoder_segment_ids, encoder_positions = _defaults(encoder_inputs, encoder_segment_ids, encoder_positions)
        memory = self.encode(encoder_inputs, encoder_segment_ids, encoder_positions)
        x = self.decode(tokens, segment_ids, positions, memory, encoder_segment_ids, encoder_positions)
        return x, {}

    def __call__(self, tokens, segment_ids=None, positions=None, return_stats: bool = False, *,
                 encoder_inputs, encoder_segment_ids=None, encoder_positions=None):
        """Logits [B, L, vocab] of the target tokens given the source tokens `encoder_inputs`."""
        segment_ids, positions = _defaults(tokens, segment_ids, positions)
        x, stats = self.hidden(tokens, segment_ids, positions, encoder_inputs, encoder_segment_ids,
                               encoder_positions)
        logits = self.logits(x)
        return (logits, stats) if return_stats else logits
