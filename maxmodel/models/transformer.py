"""Decoder-only transformer: embeddings, a stack of pre-norm blocks (scanned or unrolled), final norm, head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxmodel.config.errors import ConfigError
from maxmodel.config.schema import Config, ModelConfig

from . import kv_cache
from .attention import Attention
from .layers import MLP, Embed, adapt, dense, dense_rows, make_norm
from .moe import MoE
from .remat import POLICIES as REMAT_POLICIES
from .sharding import constrain, param

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
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
    """x + attn(norm(x)) then x + ffn(norm(x)); or, PaLM's parallel form, x + attn(norm(x)) + mlp(norm(x)).
    The feed-forward part is a dense MLP or, with `moe`, a Mixture of Experts. With post_norms (Gemma 2) each
    branch's output is normalised again before it is added. Returns (x, MoE stats)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype=jnp.float32, moe: bool = False,
                 causal: bool = True):
        self.parallel = cfg.parallel_block
        self.is_moe = moe
        self.attn_norm = make_norm(cfg, param_dtype)
        self.attn = Attention(cfg, rngs, param_dtype, window=cfg.attention.sliding_window, causal=causal)
        if not self.parallel:
            self.mlp_norm = make_norm(cfg, param_dtype)
        self.mlp = MoE(cfg, rngs, param_dtype) if moe else MLP(cfg, rngs, param_dtype)
        if cfg.post_norms:
            self.attn_post_norm = make_norm(cfg, param_dtype)
            self.mlp_post_norm = make_norm(cfg, param_dtype)
        self.post_norms = cfg.post_norms
        self.post_norm = cfg.norm_position == "post"
        if self.post_norm and (self.parallel or cfg.post_norms):
            raise ConfigError("model.norm_position", "post-norm blocks are sequential with one norm per branch: "
                                                     "unset model.parallel_block and model.post_norms")

    def _ffn(self, h):
        y, stats = self.mlp(h) if self.is_moe else (self.mlp(h), {})
        y = adapt(self, "mlp", y)
        return (self.mlp_post_norm(y) if self.post_norms else y), stats

    def __call__(self, x, segment_ids, positions, window=None, prefix=None):
        return self._forward(x, lambda h: self.attn(h, segment_ids, positions, window, prefix))

    def decode(self, x, positions, lengths, cache, window=None):
        """The block on new tokens against a KV cache (kv_cache.py): (x, the updated cache)."""
        written = {}

        def attend(h):
            out, written["cache"] = self.attn.decode(h, positions, lengths, cache, window)
            return out
        x, _ = self._forward(x, attend)
        return x, written["cache"]

    def _forward(self, x, attend):
        """The block around its attention `attend(h) -> [B, L, d_model]`; returns (x, MoE stats)."""
        if self.post_norm:  # BERT / original Transformer: norm(x + attn(x)) then norm(x + ffn(x))
            x = constrain(self.attn_norm(x + adapt(self, "attn", attend(x))), ACT)
            y, stats = self.mlp(x) if self.is_moe else (self.mlp(x), {})
            return constrain(self.mlp_norm(x + adapt(self, "mlp", y)), ACT), stats
        h = self.attn_norm(x)
        a = adapt(self, "attn", attend(h))
        if self.post_norms:
            a = self.attn_post_norm(a)
        if self.parallel:
            y, stats = self._ffn(h)
            return constrain(x + a + y, ACT), stats
        x = constrain(x + a, ACT)
        y, stats = self._ffn(self.mlp_norm(x))
        return constrain(x + y, ACT), stats


class BlockGroup(nnx.Module):
    """`every` consecutive layers, the last one MoE (GLaM's alternating stack): the unit that is scanned."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype=jnp.float32, causal: bool = True):
        every = cfg.moe.every
        self.blocks = nnx.List([Block(cfg, rngs, param_dtype, moe=i == every - 1, causal=causal)
                                for i in range(every)])

    def __call__(self, x, segment_ids, positions, window=None, prefix=None):  # no per-layer windows with MoE
        stats = {}
        for block in self.blocks:
            x, s = block(x, segment_ids, positions, prefix=prefix)
            stats = stats or s
        return x, stats

    def decode(self, x, positions, lengths, caches):
        """caches: one per block of the group."""
        out = []
        for block, cache in zip(self.blocks, caches):
            x, cache = block.decode(x, positions, lengths, cache)
            out.append(cache)
        return x, out


def is_moe_layer(cfg: ModelConfig, i: int) -> bool:
    """Layer i (from 0) is MoE: past the first dense layers, every `every`-th one (the last of each group)."""
    moe = cfg.moe
    return bool(moe.num_experts) and i >= moe.first_dense_layers and (i - moe.first_dense_layers + 1) % moe.every == 0


def _stack(make, n: int, rngs: nnx.Rngs):
    """n copies of a module with their parameters stacked on a leading `layers` axis (for nnx.scan)."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_stack(rngs):
        return make(rngs)
    return make_stack(rngs)


def _stack_stats(per_layer: list[dict]) -> dict:
    per_layer = [s for s in per_layer if s]
    return {k: jnp.stack([s[k] for s in per_layer]) for k in per_layer[0]} if per_layer else {}


class Transformer(nnx.Module):
    causal = True  # the encoder (encoder.py) subclasses this stack with bidirectional attention
    head_vocab_major = False  # an untied head stored [vocab, d_model]: the engine's XLA:CPU decode layout

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        m = cfg.model
        causal = self.causal
        self.cfg = cfg
        self.dtype = DTYPES[cfg.train.dtype]
        param_dtype = DTYPES[cfg.train.param_dtype]
        self.embed = Embed(m, rngs, param_dtype)
        moe = m.moe
        if not cfg.train.scan_layers:
            self.layers = nnx.List([Block(m, rngs, param_dtype, moe=is_moe_layer(m, i), causal=causal)
                                    for i in range(m.num_layers)])
        elif not moe.num_experts:
            self.layers = _stack(lambda r: Block(m, r, param_dtype, causal=causal), m.num_layers, rngs)
        else:  # scanned MoE stack: the first dense layers, then repeated units ending in an MoE layer
            if moe.first_dense_layers:
                self.first_layers = _stack(lambda r: Block(m, r, param_dtype, causal=causal),
                                           moe.first_dense_layers, rngs)
            unit = (lambda r: Block(m, r, param_dtype, moe=True, causal=causal)) if moe.every == 1 else (
                lambda r: BlockGroup(m, r, param_dtype, causal=causal))
            self.layers = _stack(unit, (m.num_layers - moe.first_dense_layers) // moe.every, rngs)
        # Post-norm stacks end normalised already; pre-norm stacks need the final norm.
        self.final_norm = make_norm(m, param_dtype) if m.norm_position == "pre" else None
        if not m.tie_embeddings:
            self.head = param(rngs, (m.d_model, m.vocab_size), ("embed", "vocab"), std=m.init_std,
                              dtype=param_dtype)

    def _block_fn(self):
        policy = self.cfg.train.remat

        def run(block, x, segment_ids, positions, window=None, prefix=None):
            return block(x, segment_ids, positions, window, prefix)
        if policy == "none":
            return run
        return nnx.remat(run, policy=REMAT_POLICIES[policy], prevent_cse=not self.cfg.train.scan_layers)

    def embed_inputs(self, tokens, positions):
        """The first layer's input [B, L, d_model]."""
        return self.embed(tokens, positions, self.dtype)

    def hidden(self, tokens, segment_ids, positions, prefix=None, task=None, prompt_slots=None):
        """Final-norm hidden states [B, L, d_model] and the MoE layers' stats (each [num_moe_layers, ...]).
        prefix: [B, L], nonzero on each document's bidirectional prefix (prefix LM), or None. task: each row's
        (or position's) soft-prompt table (peft.method=prompt, finetune/peft/prompt.py), or None for table 0;
        prompt_slots: [B, L], where the data pipeline left the soft prompt's places (else it is prepended)."""
        x = self.embed_inputs(tokens, positions)
        soft = vars(self).get("soft_prompt")
        prepended = soft is not None and prompt_slots is None
        if prepended:  # k virtual tokens in front; dropped again below
            x, segment_ids, positions, prefix = soft.prepend(x, segment_ids, positions, prefix, task)
            x = constrain(x, ACT)
        elif soft is not None:
            x = constrain(soft.fill(x, prompt_slots, task), ACT)
        block_fn = self._block_fn()
        mesh = jax.sharding.get_abstract_mesh()
        stages = 1 if mesh.empty else mesh.shape.get("stage", 1)
        stats = {}
        windows = layer_windows(self.cfg.model)
        if windows is not None and (stages > 1 or (not mesh.empty and mesh.shape.get("sequence", 1) > 1)):
            raise ConfigError("model.attention.global_every", "alternating local/global attention is not "
                                                              "supported with mesh.stage > 1 or mesh.sequence > 1")
        if stages > 1:
            x, stats = self._pipeline(x, segment_ids, positions, block_fn, stages, mesh, prefix)
        elif self.cfg.train.scan_layers and windows is not None:  # dense stack, one window per layer
            @nnx.scan(in_axes=(nnx.Carry, 0, None, None, 0, None), out_axes=(nnx.Carry, 0),
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def body_windowed(x, block, segment_ids, positions, window, prefix):
                return block_fn(block, x, segment_ids, positions, window, prefix)
            x, stats = body_windowed(x, self.layers, segment_ids, positions, jnp.asarray(windows), prefix)
        elif self.cfg.train.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0, None, None, None), out_axes=(nnx.Carry, 0),
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def body(x, block, segment_ids, positions, prefix):
                return block_fn(block, x, segment_ids, positions, None, prefix)
            if hasattr(self, "first_layers"):
                x, _ = body(x, self.first_layers, segment_ids, positions, prefix)
            x, stats = body(x, self.layers, segment_ids, positions, prefix)
        else:
            per_layer = []
            for i, block in enumerate(self.layers):
                x, s = block_fn(block, x, segment_ids, positions, None if windows is None else int(windows[i]),
                                prefix)
                per_layer.append(s)
            stats = _stack_stats(per_layer)
        if prepended:
            x = constrain(x[:, soft.length:], ACT)
        return (self.final_norm(x) if self.final_norm is not None else x), stats

    def _pipeline(self, x, segment_ids, positions, block_fn, stages, mesh, prefix=None):
        """The stacked layers as a pipeline over `stage` (GPipe, or circular when pipeline.repeats > 1);
        -> (x, MoE stats per layer, averaged over the pipeline's microbatches)."""
        from maxmodel.parallel.pipeline import pipeline_apply
        graphdef, stacked = nnx.split(self.layers)
        moe = bool(self.cfg.model.moe.num_experts)

        def layer_fn(layer_params, x, aux):
            out = block_fn(nnx.merge(graphdef, layer_params), x, aux["segment_ids"], aux["positions"], None,
                           aux.get("prefix"))
            return out if moe else out[0]
        pipe = self.cfg.pipeline
        aux = {"segment_ids": segment_ids, "positions": positions}
        if prefix is not None:
            aux["prefix"] = prefix
        out = pipeline_apply(layer_fn, stacked, x, num_stages=stages,
                             num_microbatches=pipe.microbatches or stages, repeats=pipe.repeats,
                             aux=aux, length_axis="sequence" if mesh.shape.get("sequence", 1) > 1 else None,
                             with_stats=moe)
        return out if moe else (out, {})

    def one_f_one_b(self) -> bool:
        """Whether the loss runs inside a 1F1B / interleaved 1F1B pipeline (`pipelined_loss`)."""
        from maxmodel.parallel.mesh import ONE_F_ONE_B
        mesh = jax.sharding.get_abstract_mesh()
        return self.cfg.pipeline.schedule in ONE_F_ONE_B and not mesh.empty and mesh.shape.get("stage", 1) > 1

    def pipelined_loss(self, tokens, segment_ids, positions, loss_fn, loss_inputs: dict, aux_scale=None):
        """(summed objective, summed metrics, MoE stats) of loss_fn(logits_m, loss_inputs_m) -> (objective,
        metrics) over the pipeline's microbatches, with the stack as a 1F1B or interleaved 1F1B pipeline and the
        final norm, head and loss_fn on its last stage (parallel/pipeline_1f1b.py): gradients come from its
        explicit per-stage backward steps, and autodiff carries them on into the embedding. With MoE layers the
        objective also holds their aux and router z-losses (per-token means) times `aux_scale` (the step's
        token count), as the step adds them outside a pipeline; the stats are averaged over microbatches."""
        from maxmodel.parallel.mesh import ZERO_BUBBLE
        from maxmodel.parallel.pipeline_1f1b import pipeline_loss
        x = constrain(self.embed_inputs(tokens, positions), ACT)
        graphdef, stacked = nnx.split(self.layers)
        block_fn = self._block_fn()

        moe = self.cfg.model.moe
        weights = None
        pipe, stages = self.cfg.pipeline, jax.sharding.get_abstract_mesh().shape["stage"]
        micro = pipe.microbatches or stages
        if moe.num_experts:  # d objective / d (one microbatch's per-layer stat), the stats being mean over them
            per = aux_scale / micro
            weights = {"aux_loss": moe.aux_loss_weight * per, "z_loss": moe.z_loss_weight * per,
                       **{k: jnp.zeros((), jnp.float32) for k in ("load", "dropped", "sent_rows")}}

        def layer_fn(layer_params, h, aux):
            out = block_fn(nnx.merge(graphdef, layer_params), h, aux["segment_ids"], aux["positions"])
            return out if weights is not None else out[0]
        norm = nnx.split(self.final_norm) if self.final_norm is not None else None
        softcap = self.cfg.model.final_logit_softcap

        def tail_fn(tail, h, inputs):
            if norm is not None:
                h = nnx.merge(norm[0], tail["norm"])(h)
            logits = dense(h, tail["head"].astype(h.dtype))
            if softcap:
                logits = softcap * jnp.tanh(logits / softcap)
            return loss_fn(logits, inputs)
        tail = {"head": self.head_matrix(), **({"norm": norm[1]} if norm is not None else {})}
        return pipeline_loss(layer_fn, tail_fn, stacked, tail, x, {"segment_ids": segment_ids, "positions": positions},
                             loss_inputs, num_stages=stages, num_microbatches=micro, repeats=pipe.repeats,
                             stats_weights=weights, split_backward=pipe.schedule == ZERO_BUBBLE)

    # ---- decoding with a KV cache (maxmodel/inference): new tokens against cached keys and values ----

    def cache_groups(self) -> list[tuple[str, list[int]]]:
        """How the layers are cached: (attribute, per-sub-layer windows) per group of layers. A scanned stack
        is one group cached as stacked arrays, its unit split into sub-layers of their own cache size (Gemma 2's
        local/global pairs, GLaM's dense+MoE groups); an unrolled stack is one group per layer."""
        m = self.cfg.model
        windows = layer_windows(m)
        if not self.cfg.train.scan_layers:
            return [(f"layers.{i}", [int(windows[i]) if windows is not None else m.attention.sliding_window])
                    for i in range(m.num_layers)]
        if windows is not None:
            every = m.attention.global_every
            if m.num_layers % every:
                raise ConfigError("model.attention.global_every", f"decoding a scanned stack needs num_layers="
                                  f"{m.num_layers} divisible by global_every={every} (or train.scan_layers=false)")
            return [("layers", [int(w) for w in windows[:every]])]
        groups = [("first_layers", [m.attention.sliding_window])] if hasattr(self, "first_layers") else []
        unit = m.moe.every if m.moe.num_experts and m.moe.every > 1 else 1
        return groups + [("layers", [m.attention.sliding_window] * unit)]

    def init_cache(self, batch: int, max_len: int, spare: int = 0, quantized: bool = False) -> dict:
        """An empty cache for `batch` rows of up to `max_len` tokens: {group: [cache per sub-layer]}, each
        stacked over the group's units when scanned."""
        m = self.cfg.model
        out = {}
        for name, windows in self.cache_groups():
            units = 0  # unrolled layer: no stacking
            if "." not in name:  # a scanned stack: one cache per sub-layer, stacked over the units
                layers = jax.tree.leaves(nnx.state(getattr(self, name)))[0].shape[0]
                units = layers // len(windows) if layer_windows(m) is not None else layers
            caches = []
            for w in windows:
                c = kv_cache.empty_cache(batch, m.num_kv_heads, kv_cache.cache_slots(max_len, w, spare),
                                         m.head_dim, self.dtype, quantized)
                caches.append(jax.tree.map(lambda a: jnp.broadcast_to(a, (units, *a.shape)), c) if units else c)
            out[name] = caches
        return out

    def decode(self, tokens, positions, lengths, cache):
        """tokens, positions: [B, T] new tokens (position -1 = padding) following the `lengths` [B] tokens
        already in `cache` (from init_cache). Returns (final-norm hidden states [B, T, d_model], new cache)."""
        x = self.embed_inputs(tokens, jnp.maximum(positions, 0))
        new_cache = {}
        for name, windows in self.cache_groups():
            if "." in name:  # one unrolled layer
                x, c = self.layers[int(name.split(".")[1])].decode(x, positions, lengths, cache[name][0], windows[0])
                new_cache[name] = [c]
            else:
                x, new_cache[name] = self._decode_stack(getattr(self, name), windows, x, positions, lengths,
                                                        cache[name])
        return (self.final_norm(x) if self.final_norm is not None else x), new_cache

    def _decode_stack(self, stack, windows, x, positions, lengths, caches):
        """A scanned stack over its units; a unit of several sub-layers is a BlockGroup, or (alternating
        windows) consecutive layers of the stack taken together."""
        graphdef, state = nnx.split(stack)
        split_units = layer_windows(self.cfg.model) is not None
        if split_units:  # [L, ...] -> [L / every, every, ...]
            state = jax.tree.map(lambda a: a.reshape(a.shape[0] // len(windows), len(windows), *a.shape[1:]), state)

        def body(x, unit):
            unit_state, unit_caches = unit
            if split_units:
                out = []
                for j, (w, c) in enumerate(zip(windows, unit_caches)):
                    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[j], unit_state))
                    x, c = block.decode(x, positions, lengths, c, w)
                    out.append(c)
                return x, out
            module = nnx.merge(graphdef, unit_state)
            if isinstance(module, BlockGroup):
                return module.decode(x, positions, lengths, unit_caches)
            x, c = module.decode(x, positions, lengths, unit_caches[0], windows[0])
            return x, [c]
        return jax.lax.scan(body, x, (state, caches))

    def head_matrix(self):
        """The output projection as [d_model, vocab] (the embedding table transposed when tied)."""
        if self.cfg.model.tie_embeddings:
            return self.embed.table[...].astype(self.dtype).T
        return self.head[...].astype(self.dtype)

    def logits(self, x):
        m = self.cfg.model
        if m.tie_embeddings:
            out = self.embed.attend(x)
        elif self.head_vocab_major:  # [V, d], multiplied as a tied table is
            out = dense_rows(x, self.head[...].astype(x.dtype))
        else:
            out = dense(x, self.head[...].astype(x.dtype))
        if m.final_logit_softcap:
            out = m.final_logit_softcap * jnp.tanh(out / m.final_logit_softcap)
        return constrain(out, ("activation_batch", "activation_length", "activation_vocab"))

    def __call__(self, tokens, segment_ids=None, positions=None, return_stats: bool = False, prefix=None,
                 task=None, prompt_slots=None):
        """Logits [B, L, vocab]; with return_stats, also the MoE stats (load, dropped, aux_loss, z_loss,
        sent_rows)."""
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x, stats = self.hidden(tokens, segment_ids, positions, prefix, task, prompt_slots)
        logits = self.logits(x)
        return (logits, stats) if return_stats else logits
