"""Decoder-only transformer: embeddings, a stack of pre-norm blocks (scanned or unrolled), final norm, head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxmodel.config.errors import ConfigError
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


def layer_windows(m: ModelConfig) -> np.ndarray | None:
    """Per-layer sliding windows when local and global layers alternate (0 = global), else None.
    Gemma 2 (global_every=2): layers 0, 2, ... local; 1, 3, ... global."""
    every = m.attention.global_every
    if not every:
        return None
    return np.array([0 if (i + 1) % every == 0 else m.attention.sliding_window for i in range(m.num_layers)],
                    np.int32)


class Block(nnx.Module):
    """x + attn(norm(x)) then x + mlp(norm(x)); or, PaLM's parallel form, x + attn(norm(x)) + mlp(norm(x)).
    With post_norms (Gemma 2) each branch's output is normalised again before it is added."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.parallel = cfg.parallel_block
        self.attn_norm = make_norm(cfg, param_dtype)
        self.attn = Attention(cfg, rngs, param_dtype, window=cfg.attention.sliding_window)
        if not self.parallel:
            self.mlp_norm = make_norm(cfg, param_dtype)
        self.mlp = MLP(cfg, rngs, param_dtype)
        if cfg.post_norms:
            self.attn_post_norm = make_norm(cfg, param_dtype)
            self.mlp_post_norm = make_norm(cfg, param_dtype)
        self.post_norms = cfg.post_norms

    def __call__(self, x, segment_ids, positions, window=None):
        h = self.attn_norm(x)
        a = self.attn(h, segment_ids, positions, window)
        if self.post_norms:
            a = self.attn_post_norm(a)
        if self.parallel:
            m = self.mlp(h)
            return constrain(x + a + (self.mlp_post_norm(m) if self.post_norms else m), ACT)
        x = constrain(x + a, ACT)
        m = self.mlp(self.mlp_norm(x))
        return constrain(x + (self.mlp_post_norm(m) if self.post_norms else m), ACT)


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

        def run(block, x, segment_ids, positions, window=None):
            return block(x, segment_ids, positions, window)
        if policy == "none":
            return run
        return nnx.remat(run, policy=REMAT_POLICIES[policy], prevent_cse=not self.cfg.train.scan_layers)

    def hidden(self, tokens, segment_ids, positions):
        """Final-norm hidden states [B, L, d_model]."""
        x = self.embed(tokens, positions, self.dtype)
        block_fn = self._block_fn()
        mesh = jax.sharding.get_abstract_mesh()
        stages = 1 if mesh.empty else mesh.shape.get("stage", 1)
        windows = layer_windows(self.cfg.model)
        if windows is not None and (stages > 1 or (not mesh.empty and mesh.shape.get("sequence", 1) > 1)):
            raise ConfigError("model.attention.global_every", "alternating local/global attention is not "
                                                              "supported with mesh.stage > 1 or mesh.sequence > 1")
        if stages > 1:
            x = self._pipeline(x, segment_ids, positions, block_fn, stages, mesh)
        elif self.cfg.train.scan_layers and windows is not None:
            @nnx.scan(in_axes=(nnx.Carry, 0, None, None, 0), out_axes=nnx.Carry,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def body_windowed(x, block, segment_ids, positions, window):
                return block_fn(block, x, segment_ids, positions, window)
            x = body_windowed(x, self.layers, segment_ids, positions, jnp.asarray(windows))
        elif self.cfg.train.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0, None, None), out_axes=nnx.Carry,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def body(x, block, segment_ids, positions):
                return block_fn(block, x, segment_ids, positions)
            x = body(x, self.layers, segment_ids, positions)
        else:
            for i, block in enumerate(self.layers):
                x = block_fn(block, x, segment_ids, positions, None if windows is None else int(windows[i]))
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
