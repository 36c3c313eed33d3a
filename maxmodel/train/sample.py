"""Greedy continuation of a prompt, for the end-of-training demo (the generation stack is separate)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def greedy_continue(graphdef, params, prompt_ids: list[int], new_tokens: int, max_len: int, rows: int = 1,
                    prefix_lm: bool = False) -> list[int]:
    """Append `new_tokens` argmax tokens. One compiled forward over a fixed-length buffer: the causal mask
    makes the logits at position t independent of the (not yet written) tokens after it. With `prefix_lm`
    the prompt is the bidirectional prefix (it never sees the continuation either)."""
    length = min(max_len, len(prompt_ids) + new_tokens)
    prompt_ids = prompt_ids[-(length - 1):] if len(prompt_ids) >= length else prompt_ids
    buf = np.zeros((rows, length), np.int32)
    buf[:, :len(prompt_ids)] = prompt_ids
    prefix = jnp.asarray(np.broadcast_to(np.arange(length) < len(prompt_ids), buf.shape).astype(np.int32))

    @jax.jit
    def next_token(params, tokens, t):
        logits = nnx.merge(graphdef, params)(tokens, prefix=prefix if prefix_lm else None)
        return jnp.argmax(logits[:, t - 1], axis=-1)

    for t in range(len(prompt_ids), length):
        buf[:, t] = np.asarray(jax.device_get(next_token(params, jnp.asarray(buf), t)))
    return buf[0, len(prompt_ids):].tolist()


def greedy_translate(graphdef, params, source_ids: list[int], bos_id: int, eos_id: int, new_tokens: int,
                     max_len: int, rows: int = 1) -> list[int]:
    """Encoder-decoder: up to `new_tokens` argmax target tokens for one source (ends at EOS). Like
    greedy_continue, one compiled forward over fixed-length buffers; the decoder's causal mask makes
    position t independent of the unwritten tokens after it."""
    source = np.zeros((rows, max_len), np.int32)
    source_ids = list(source_ids[:max_len - 1]) + [eos_id]
    source[:, :len(source_ids)] = source_ids
    source_segments = (np.arange(max_len) < len(source_ids)).astype(np.int32)[None].repeat(rows, 0)
    length = min(max_len, new_tokens + 1)
    buf = np.zeros((rows, length), np.int32)
    buf[:, 0] = bos_id

    @jax.jit
    def next_token(params, tokens, t):
        logits = nnx.merge(graphdef, params)(tokens, encoder_inputs=source, encoder_segment_ids=source_segments)
        return jnp.argmax(logits[:, t - 1], axis=-1)

    for t in range(1, length):
        buf[:, t] = np.asarray(jax.device_get(next_token(params, jnp.asarray(buf), t)))
        if buf[0, t] == eos_id:
            return buf[0, 1:t].tolist()
    return buf[0, 1:].tolist()
