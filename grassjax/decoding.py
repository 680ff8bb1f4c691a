"""Streaming generation: prefill the prompt once, then one token per step from cached state.

Attention layers keep a key/value cache that grows with the context
(B, max_len, H, D per layer, for K and V). Grassmann layers keep only the last
max(offsets) reduced states (B, max(offsets), r per layer), so their memory
and per-token cost do not depend on the context length.

`generate_streaming` gives the same tokens as `grassjax.sampling.generate`
(full recomputation) for the same key: the same key schedule and the same
`sample_logits`. Logits may differ in the last ulp between the two paths;
the sampled ids do not. Learned position embeddings cap the text at
model.cfg.block_size tokens.

Caches are plain pytrees (a list with one dict per block), so the whole loop
is one jitted `lax.scan` with no Python loop per token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from grassjax import sampling
from grassjax.nn.model import BigramLanguageModel, LanguageModel


def _logits(model: LanguageModel, x: jax.Array) -> jax.Array:
    """Final norm and head, as in LanguageModel.__call__: (..., C) -> (..., V) float32."""
    x = model.final_norm(x)
    logits = model.tok_embed.attend(x) if model.head is None else model.head(x)
    return logits.astype(jnp.float32)


def init_caches(model: LanguageModel, batch: int, max_len: int) -> list[dict]:
    """Empty per-block caches for texts of up to max_len tokens."""
    return [block.init_cache(batch, max_len) for block in model.blocks]


def prefill(model: LanguageModel, prompt: jax.Array, max_len: int) -> tuple[jax.Array, list[dict]]:
    """One forward pass over prompt (B, P): (logits at position P-1 (B, V), caches with room for max_len)."""
    B, P = prompt.shape
    x = model.tok_embed(prompt) + model.pos_embed(jnp.arange(P))  # (B, P, C)
    caches = []
    for block in model.blocks:
        x, cache = block.prefill(x, max_len)
        caches.append(cache)
    return _logits(model, x[:, -1]), caches


def decode_step(model: LanguageModel, token: jax.Array, caches: list[dict]) -> tuple[jax.Array, list[dict]]:
    """Feed token (B,) at position caches[0]["pos"]: (next-token logits (B, V), updated caches)."""
    pos = caches[0]["pos"]
    x = model.tok_embed(token) + model.pos_embed(pos)  # (B, C)
    new_caches = []
    for block, cache in zip(model.blocks, caches):
        x, cache = block.decode(x, cache)
        new_caches.append(cache)
    return _logits(model, x), new_caches


def teacher_forced_logits(model: LanguageModel, tokens: jax.Array, prompt_len: int) -> tuple[jax.Array, list[dict]]:
    """Stream a known text through the cached decoder: prefill tokens[:, :prompt_len], then feed the rest.

    Returns the next-token logits at positions prompt_len-1 .. T-1 (B, T - prompt_len + 1, V), which
    must equal the full forward's model(tokens)[:, prompt_len-1:], and the final caches.
    """

    @jax.jit
    def stream(tokens):
        first, caches = prefill(model, tokens[:, :prompt_len], tokens.shape[1])

        def step(caches, token):
            logits, caches = decode_step(model, token, caches)
            return caches, logits

        caches, rest = jax.lax.scan(step, caches, tokens[:, prompt_len:].T)
        return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1), caches

    return stream(tokens)


def sample_tokens(model: LanguageModel, logits: jax.Array, caches: list[dict], key: jax.Array, *, num_tokens: int,
                  temperature: float = 1.0, top_k: int | None = None) -> tuple[jax.Array, list[dict]]:
    """Sample num_tokens >= 1 tokens starting from `logits` (B, V); returns (tokens (B, num_tokens), caches).

    Key schedule as in sampling.generate: before each draw, key, sub = split(key).
    The last token drawn is not fed back, so caches end one position short of it.
    """
    draw = lambda logits, key: sampling.sample_logits(logits, key, temperature=temperature, top_k=top_k)
    key, sub = jax.random.split(key)
    first = draw(logits, sub).astype(jnp.int32)  # (B,)

    def step(carry, _):
        token, caches, key = carry
        logits, caches = decode_step(model, token, caches)
        key, sub = jax.random.split(key)
        token = draw(logits, sub).astype(jnp.int32)
        return (token, caches, key), token

    (_, caches, _), rest = jax.lax.scan(step, (first, caches, key), None, length=num_tokens - 1)  # rest (N-1, B)
    return jnp.concatenate([first[:, None], rest.T], axis=1), caches


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k"))
def _generate_streaming(graphdef, state, prompt, key, *, max_new_tokens, temperature, top_k):
    model = nnx.merge(graphdef, state)
    logits, caches = prefill(model, prompt, prompt.shape[1] + max_new_tokens)
    new, _ = sample_tokens(model, logits, caches, key, num_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k)
    return jnp.concatenate([prompt, new.astype(prompt.dtype)], axis=1)


def generate_streaming(model: nnx.Module, prompt: jax.Array, key: jax.Array, *, max_new_tokens: int,
                       temperature: float = 1.0, top_k: int | None = None) -> jax.Array:
    """Extend prompt (B, P) int32 by max_new_tokens with cached state; returns (B, P + max_new_tokens).

    Same tokens as sampling.generate with the same key, for P + max_new_tokens <= block_size.
    """
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (batch, length >= 1) token ids, got shape {prompt.shape}")
    if max_new_tokens < 1:
        return prompt
    if isinstance(model, BigramLanguageModel):  # no state beyond the last token: recomputation is already O(1)
        return sampling.generate(model, prompt, key, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k)
    total = prompt.shape[1] + max_new_tokens
    if total > model.cfg.block_size:
        raise ValueError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                         f"model.block_size={model.cfg.block_size}: learned position embeddings end there")
    graphdef, state = nnx.split(model)
    return _generate_streaming(graphdef, state, prompt, key, max_new_tokens=max_new_tokens,
                               temperature=float(temperature), top_k=top_k)


def cache_bytes(model: nnx.Module, batch: int, context: int) -> int:
    """Bytes of generation state for `batch` texts of `context` tokens (all blocks; 0 for the bigram).

    Attention: K and V for every position, 2 * layers * batch * context * C * itemsize.
    Grassmann: the last max(offsets) reduced states, layers * batch * max(offsets) * r * itemsize,
    whatever the context. Plus 4 bytes per block for the position counter.
    """
    if isinstance(model, BigramLanguageModel):
        return 0
    shapes = jax.eval_shape(lambda: init_caches(model, batch, context))  # shapes only, nothing allocated
    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(shapes))
