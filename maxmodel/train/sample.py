"""Greedy continuation of a prompt, for the end-of-training demo (the generation stack is separate).

It runs on the training mesh, whatever its layout and however many processes share it: every process calls
it (the forward is one SPMD program over all devices), the token buffer is a replicated global array whose
length is padded to fit the mesh's `sequence` axis (context parallelism shards the length), and the next
token comes back replicated, so every process can read it without fetching non-addressable shards.
"""
from __future__ import annotations

import logging
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)
BATCH_AXES = ("data", "fsdp", "expert")


def _rows(mesh) -> int:
    """One row per batch shard: the model's activation_batch constraint splits rows over these axes."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))


def _fit_length(length: int, max_len: int, mesh) -> int:
    """`length` rounded up to a multiple of the sequence axis (the positions past the written tokens are
    never attended to by causal attention, so padding changes nothing), at most `max_len`, which the layout
    check already requires to be such a multiple."""
    n = mesh.shape.get("sequence", 1)
    return min(max_len, -(-length // n) * n)


def _replicated(mesh, array: np.ndarray) -> jax.Array:
    """The same host array on every device of `mesh`, also across processes (each passes the same value)."""
    return jax.make_array_from_callback(array.shape, NamedSharding(mesh, P()), lambda index: array[index])


def greedy_continue(graphdef, params, prompt_ids: list[int], new_tokens: int, max_len: int, mesh,
                    prefix_lm: bool = False) -> list[int]:
    """Append `new_tokens` argmax tokens. One compiled forward over a fixed-length buffer: the causal mask
    makes the logits at position t independent of the (not yet written) tokens after it. With `prefix_lm`
    the prompt is the bidirectional prefix (it never sees the continuation either)."""
    wanted = min(max_len, len(prompt_ids) + new_tokens)
    prompt_ids = prompt_ids[-(wanted - 1):] if len(prompt_ids) >= wanted else prompt_ids
    length = _fit_length(wanted, max_len, mesh)
    buf = np.zeros((_rows(mesh), length), np.int32)
    buf[:, :len(prompt_ids)] = prompt_ids
    prefix = np.broadcast_to(np.arange(length) < len(prompt_ids), buf.shape).astype(np.int32)

    @partial(jax.jit, out_shardings=NamedSharding(mesh, P()))  # replicated: readable on every process
    def next_token(params, tokens, t):
        logits = nnx.merge(graphdef, params)(tokens, prefix=prefix if prefix_lm else None)
        return jnp.argmax(logits[:, t - 1], axis=-1)

    for t in range(len(prompt_ids), wanted):
        buf[:, t] = np.asarray(next_token(params, _replicated(mesh, buf), t))
    return buf[0, len(prompt_ids):wanted].tolist()


def greedy_translate(graphdef, params, source_ids: list[int], bos_id: int, eos_id: int, new_tokens: int,
                     max_len: int, mesh) -> list[int]:
    """Encoder-decoder: up to `new_tokens` argmax target tokens for one source (ends at EOS). Like
    greedy_continue, one compiled forward over fixed-length buffers; the decoder's causal mask makes
    position t independent of the unwritten tokens after it."""
    rows = _rows(mesh)
    source = np.zeros((rows, max_len), np.int32)
    source_ids = list(source_ids[:max_len - 1]) + [eos_id]
    source[:, :len(source_ids)] = source_ids
    source_segments = (np.arange(max_len) < len(source_ids)).astype(np.int32)[None].repeat(rows, 0)
    wanted = min(max_len, new_tokens + 1)
    buf = np.zeros((rows, _fit_length(wanted, max_len, mesh)), np.int32)
    buf[:, 0] = bos_id

    @partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
    def next_token(params, tokens, t):
        logits = nnx.merge(graphdef, params)(tokens, encoder_inputs=source, encoder_segment_ids=source_segments)
        return jnp.argmax(logits[:, t - 1], axis=-1)

    for t in range(1, wanted):
        buf[:, t] = np.asarray(next_token(params, _replicated(mesh, buf), t))
        if buf[0, t] == eos_id:
            return buf[0, 1:t].tolist()
    return buf[0, 1:wanted].tolist()


def end_of_run_sample(cfg, result) -> str | None:
    """The line `maxmodel train` prints after training, or None when there is nothing to sample. Called on
    every process. A failure here is logged, not raised: the exit code says how training went."""
    if cfg.model.arch == "encoder":  # an encoder fills in masks; it has no left-to-right continuation
        return None
    if result.tokenizer is None or cfg.run.sample_tokens <= 0 or result.final_step <= result.start_step:
        return None
    from maxmodel.parallel.rules import mesh_rules
    tok, mesh = result.tokenizer, result.mesh
    try:
        with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_rules(cfg.mesh, mesh)):
            if cfg.train.objective == "seq2seq":  # the prompt is the source; the decoder writes its target
                out = greedy_translate(result.graphdef, result.params, tok.encode(cfg.run.sample_prompt),
                                       tok.bos_id, tok.eos_id, cfg.run.sample_tokens, cfg.train.seq_len, mesh)
                return f"sample (greedy seq2seq): {cfg.run.sample_prompt!r} -> {tok.decode(out)!r}"
            prompt = [tok.bos_id] + tok.encode(cfg.run.sample_prompt)
            out = greedy_continue(result.graphdef, result.params, prompt, cfg.run.sample_tokens,
                                  cfg.train.seq_len, mesh, prefix_lm=cfg.train.objective == "prefix_lm")
    except Exception:  # a demo after a finished run must not turn it into a failure
        log.warning("the end-of-run sample failed (training itself finished; run.sample_tokens=0 skips it)",
                    exc_info=True)
        return None
    return f"sample (greedy): {cfg.run.sample_prompt}{tok.decode(out)}"
