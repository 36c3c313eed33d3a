"""Decoder-only transformer: embeddings, a stack of pre-norm blocks (scanned or unrolled), final norm, head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maxmodel.config.schema import Config, ModelConfig

from .attention import Attention
from .layers import MLP, Embed, make_norm
from .sharding import constrain, param

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ACT = ("activation_batch", "activation_length", "activation_embed")


class Block(nnx.Module):
    """x + attn(norm(x)) then x + mlp(norm(x)); or, PaLM's parallel form, x + attn(norm(x)) + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.parallel = cfg.parallel_block
        self.attn_norm = make_norm(cfg, param_dtype)
        self.attn = Attention(cfg, rngs, param_dtype, window=cfg.attention.sliding_window)
        if not self.parallel:
            self.mlp_norm = make_norm(cfg, param_dtype)
        self.mlp = MLP(cfg, rngs, param_dtype)

    def __call__(self, x, segment_ids, positions):
        h = self.attn_norm(x)
        if self.parallel:
            return constrain(x + self.attn(h, segment_ids, positions) + self.mlp(h), ACT)
        x = constrain(x + self.attn(h, segment_ids, positions), ACT)
        return constrain(x + self.mlp(self.mlp_norm(x)), ACT)


class Transformer(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        m = cfg.model
        self.cfg = cfg
        self.dtype = DTYPES[cfg.train.dtype]
        param_dtype = DTYPES[cfg.train.param_dtype]
        self.embed = Embed(m, rngs, param_dtype)
        if cfg.train.scan_layers:
            @nnx.split_rngs(splits=m.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_stack(rngs):
                return Block(m, rngs, param_dtype)
            self.layers = make_stack(rngs)
        else:
            self.layers = nnx.List([Block(m, rngs, param_dtype) for _ in range(m.num_layers)])
        self.final_norm = make_norm(m, param_dtype)
        if not m.tie_embeddings:
            self.head = param(rngs, (m.d_model, m.vocab_size), ("embed", "vocab"), std=m.init_std,
                              dtype=param_dtype)

    def _block_fn(self):
        policy = self.cfg.train.remat

        def run(block, x, segment_ids, positions):
            return block(x, segment_ids, positions)
        if policy == "none":
            return run
        return nnx.remat(run, policy=REMAT_POLICIES[policy], prevent_cse=not self.cfg.train.scan_layers)

    def hidden(self, tokens, segment_ids, positions):
        """Final-norm hidden states [B, L, d_model]."""
        x = self.embed(tokens, positions, self.dtype)
        block_fn = self._block_fn()
        mesh = jax.sharding.get_abstract_mesh()
        stages = 1 if mesh.empty else mesh.shape.get("stage", 1)
        if stages > 1:
            x = self._pipeline(x, segment_ids, positions, block_fn, stages, mesh)
        elif self.cfg.train.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0, None, None), out_axes=nnx.Carry,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def body(x, block, segment_ids, positions):
                return block_fn(block, x, segment_ids, positions)
            x = body(x, self.layers, segment_ids, positions)
        else:
            for block in self.layers:
                x = block_fn(block, x, segment_ids, positions)
        return self.final_norm(x)

    def _pipeline(self, x, segment_ids, positions, block_fn, stages, mesh):
        """The stacked layers as a pipeline over `stage` (GPipe, or circular when pipeline.repeats > 1)."""
        from maxmodel.parallel.pipeline import pipeline_apply
        graphdef, stacked = nnx.split(self.layers)

        def layer_fn(layer_params, x, aux):
            return block_fn(nnx.merge(graphdef, layer_params), x, aux["segment_ids"], aux["positions"])
        pipe = self.cfg.pipeline
        return pipeline_apply(layer_fn, stacked, x, num_stages=stages,
                              num_microbatches=pipe.microbatches or stages, repeats=pipe.repeats,
                              aux={"segment_ids": segment_ids, "positions": positions},
                              length_axis="sequence" if mesh.shape.get("sequence", 1) > 1 else None)

    def head_matrix(self):
        """The output projection as [d_model, vocab] (the embedding table transposed when tied)."""
        if self.cfg.model.tie_embeddings:
            return self.embed.table[...].astype(self.dtype).T
        return self.head[...].astype(self.dtype)

    def logits(self, x):
        m = self.cfg.model
        out = self.embed.attend(x) if m.tie_embeddings else x @ self.head[...].astype(x.dtype)
        if m.final_logit_softcap:
            out = m.final_logit_softcap * jnp.tanh(out / m.final_logit_softcap)
        return constrain(out, ("activation_batch", "activation_length", "activation_vocab"))

    def __call__(self, tokens, segment_ids=None, positions=None):
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return self.logits(self.hidden(tokens, segment_ids, positions))
