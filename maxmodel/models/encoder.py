"""Encoder-only transformer (BERT, Devlin et al. 2019): the decoder's stack with bidirectional attention.

Differences from `Transformer` (whose layer stack, scanning, remat and pipelining it reuses):
- attention sees the whole of its own packed document both ways (segment ids still separate documents and
  padding, segment 0, is seen by no real token);
- embeddings are token + learned position + token type (type 0 everywhere: one segment per document),
  followed by a LayerNorm;
- the masked-LM head: dense d -> d, activation, LayerNorm, then the output projection (tied to the token
  embeddings in BERT) plus a per-token output bias;
- the pooler (dense + tanh on the first token) that BERT's next-sentence head and fine-tuning classifiers
  read; it is part of the published parameter count but not used by the masked-LM loss.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from maxmodel.config.schema import Config

from .layers import _ACTIVATIONS, LayerNorm, dense
from .sharding import constrain, param
from .transformer import DTYPES, Transformer


class Encoder(Transformer):
    causal = False

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        m = cfg.model
        d, pd = m.d_model, DTYPES[cfg.train.param_dtype]
        self.act = _ACTIVATIONS[m.activation]
        self.type_table = (param(rngs, (m.token_types, d), (None, "embed"), std=m.init_std, dtype=pd)
                           if m.token_types else None)
        self.embed_norm = LayerNorm(d, m.norm_eps, param_dtype=pd)
        self.mlm_dense = param(rngs, (d, d), ("embed", None), std=m.init_std, dtype=pd)
        self.mlm_dense_bias = param(rngs, (d,), ("embed",), dtype=pd)
        self.mlm_norm = LayerNorm(d, m.norm_eps, param_dtype=pd)
        self.mlm_bias = param(rngs, (m.vocab_size,), ("vocab",), dtype=pd)
        self.pooler = param(rngs, (d, d), ("embed", None), std=m.init_std, dtype=pd)
        self.pooler_bias = param(rngs, (d,), ("embed",), dtype=pd)

    def embed_inputs(self, tokens, positions):
        x = self.embed(tokens, positions, self.dtype)
        if self.type_table is not None:  # token type 0 for every token: each row's documents are single segments
            x = x + self.type_table[0].astype(self.dtype)
        return constrain(self.embed_norm(x), ("activation_batch", "activation_length", "activation_embed"))

    def logits(self, x):
        """The masked-LM head on every position (the loss mask picks the masked ones)."""
        h = self.act(dense(x, self.mlm_dense[...].astype(x.dtype)) + self.mlm_dense_bias[...].astype(x.dtype))
        h = self.mlm_norm(h)
        out = super().logits(h) + self.mlm_bias[...].astype(x.dtype)
        return constrain(out, ("activation_batch", "activation_length", "activation_vocab"))

    def pooled(self, x):
        """BERT's pooled output [B, d_model]: tanh(dense(hidden state of the first token))."""
        return jnp.tanh(x[:, 0] @ self.pooler[...].astype(x.dtype) + self.pooler_bias[...].astype(x.dtype))
