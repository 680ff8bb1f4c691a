"""Autoregressive sampling by full recomputation over the last block_size tokens.

One jitted `lax.fori_loop`, no Python loop per token. The window is always
block_size long: while the text is shorter than that we read the logits at
position len-1 of a left-aligned window -- causality guarantees the unused
tail of the window cannot affect them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int | None) -> jax.Array:
    """Draw one token id from (..., V) logits; temperature 0 means argmax."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "block_size", "max_new_tokens", "temperature", "top_k"))
def _generate(graphdef, params, prompt, key, *, block_size, max_new_tokens, temperature, top_k):
    model = nnx.merge(graphdef, params)
    B, P = prompt.shape
    length = P + max_new_tokens
    buf = jnp.zeros((B, max(length, block_size)), prompt.dtype).at[:, :P].set(prompt)

    def body(pos, carry):
        buf, key = carry
        start = jnp.maximum(pos - block_size, 0)
        window = jax.lax.dynamic_slice_in_dim(buf, start, block_size, axis=1)  # (B, block_size)
        logits = model(window)  # (B, block_size, V)
        last = jax.lax.dynamic_index_in_dim(logits, pos - 1 - start, axis=1, keepdims=False)  # (B, V)
        key, sub = jax.random.split(key)
        token = sample_logits(last, sub, temperature=temperature, top_k=top_k).astype(buf.dtype)
        return buf.at[:, pos].set(token), key

    buf, _ = jax.lax.fori_loop(P, length, body, (buf, key))
    return buf[:, :length]


def generate(model: nnx.Module, prompt: jax.Array, key: jax.Array, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, block_size: int | None = None) -> jax.Array:
    """Extend `prompt` (B, P) int32 by max_new_tokens; returns (B, P + max_new_tokens)."""
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (batch, length >= 1) token ids, got shape {prompt.shape}")
    graphdef, params = nnx.split(model)
    block_size = block_size or model.cfg.block_size
    return _generate(graphdef, params, prompt, key, block_size=block_size, max_new_tokens=max_new_tokens,
                     temperature=float(temperature), top_k=top_k)
