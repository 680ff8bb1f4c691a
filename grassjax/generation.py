"""Generation: sampling by full recomputation, and streaming (prefill once, then one token per step
from caches).

Both draw the same tokens for the same key (same key schedule, same `sample_logits`); their logits
may differ in the last ulp. Attention caches grow with the context (K and V per position);
Grassmann, sliding-window and conv layers keep a fixed-size window. Each is one jitted loop
(`lax.fori_loop`, `lax.scan`), no Python loop per token. Learned position embeddings cap streaming
at model.cfg.block_size tokens.
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from grassjax.nn.model import BigramLanguageModel, LanguageModel


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float,
                  top_k: int | None) -> jax.Array:
    """Draw one token id from (..., V) logits; temperature 0 means argmax."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "block_size", "max_new_tokens",
                                             "temperature", "top_k"))
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
        last = jax.lax.dynamic_index_in_dim(logits, pos - 1 - start, axis=1,
                                            keepdims=False)  # (B, V)
        key, sub = jax.random.split(key)
        token = sample_logits(last, sub, temperature=temperature, top_k=top_k).astype(buf.dtype)
        return buf.at[:, pos].set(token), key

    buf, _ = jax.lax.fori_loop(P, length, body, (buf, key))
    return buf[:, :length]


def generate(model: nnx.Module, prompt: jax.Array, key: jax.Array, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None,
             block_size: int | None = None) -> jax.Array:
    """Extend `prompt` (B, P) int32 by max_new_tokens, recomputing the model over the last
    block_size tokens for each one; returns (B, P + max_new_tokens).

    The window is always block_size long: while the text is shorter, the logits are read at position
    len-1 of a left-aligned window (causality keeps the unused tail from affecting them).
    """
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (batch, length >= 1) token ids, got shape {prompt.shape}")
    graphdef, params = nnx.split(model)
    block_size = block_size or model.cfg.block_size
    return _generate(graphdef, params, prompt, key, block_size=block_size,
                     max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k)


# --------------------------------------------------------------------------------------------------
# Streaming


def init_caches(model: LanguageModel, batch: int, max_len: int) -> list[dict]:
    """Empty per-block caches for texts of up to max_len tokens."""
    return [block.init_cache(batch, max_len) for block in model.blocks]


def prefill(model: LanguageModel, prompt: jax.Array,
            max_len: int) -> tuple[jax.Array, list[dict]]:
    """One forward pass over prompt (B, P): (logits at position P-1 (B, V), caches with room for
    max_len)."""
    x, caches, _ = model.hidden(prompt, init_caches(model, prompt.shape[0], max_len))
    return model.logits(x[:, -1]), caches


def decode_step(model: LanguageModel, token: jax.Array,
                caches: list[dict]) -> tuple[jax.Array, list[dict]]:
    """Feed token (B,) at position caches[0]["pos"]: (next-token logits (B, V), updated caches)."""
    x, caches, _ = model.hidden(token, caches)
    return model.logits(x), caches


def teacher_forced_logits(model: LanguageModel, tokens: jax.Array,
                          prompt_len: int) -> tuple[jax.Array, list[dict]]:
    """Stream a known text through the cached decoder: prefill tokens[:, :prompt_len], then feed the
    rest.

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


def sample_tokens(model: LanguageModel, logits: jax.Array, caches: list[dict], key: jax.Array, *,
                  num_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None) -> tuple[jax.Array, list[dict]]:
    """Sample num_tokens >= 1 tokens starting from `logits` (B, V); returns (tokens (B, num_tokens),
    caches).

    Key schedule as in generate: before each draw, key, sub = split(key).
    The last token drawn is not fed back, so caches end one position short of it.
    """
    draw = lambda logits, key: sample_logits(logits, key, temperature=temperature, top_k=top_k)
    key, sub = jax.random.split(key)
    first = draw(logits, sub).astype(jnp.int32)  # (B,)

    def step(carry, _):
        token, caches, key = carry
        logits, caches = decode_step(model, token, caches)
        key, sub = jax.random.split(key)
        token = draw(logits, sub).astype(jnp.int32)
        return (token, caches, key), token

    # rest (N-1, B)
    (_, caches, _), rest = jax.lax.scan(step, (first, caches, key), None, length=num_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1), caches


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k"))
def _generate_streaming(graphdef, state, prompt, key, *, max_new_tokens, temperature, top_k):
    model = nnx.merge(graphdef, state)
    logits, caches = prefill(model, prompt, prompt.shape[1] + max_new_tokens)
    new, _ = sample_tokens(model, logits, caches, key, num_tokens=max_new_tokens,
                           temperature=temperature, top_k=top_k)
    return jnp.concatenate([prompt, new.astype(prompt.dtype)], axis=1)


def generate_streaming(model: nnx.Module, prompt: jax.Array, key: jax.Array, *,
                       max_new_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None) -> jax.Array:
    """Extend prompt (B, P) int32 by max_new_tokens with cached state; returns
    (B, P + max_new_tokens).

    Same tokens as generate with the same key, for P + max_new_tokens <= block_size.
    """
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (batch, length >= 1) token ids, got shape {prompt.shape}")
    if max_new_tokens < 1:
        return prompt
    # no state beyond the last token: recomputation is already O(1)
    if isinstance(model, BigramLanguageModel):
        return generate(model, prompt, key, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k)
    total = prompt.shape[1] + max_new_tokens
    if total > model.cfg.block_size:
        raise ValueError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) = "
                         f"{total} exceeds model.block_size={model.cfg.block_size}: learned "
                         f"position embeddings end there")
    graphdef, state = nnx.split(model)
    return _generate_streaming(graphdef, state, prompt, key, max_new_tokens=max_new_tokens,
                               temperature=float(temperature), top_k=top_k)


# Module-level jits with the graph as a static argument: compiled once per model shape, not per
# call.
@functools.partial(jax.jit, static_argnames=("temperature", "top_k"))
def _draw(logits, key, *, temperature, top_k):
    return sample_logits(logits, key, temperature=temperature, top_k=top_k)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _prefill(graphdef, state, ids, *, max_len):
    return prefill(nnx.merge(graphdef, state), ids, max_len)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode(graphdef, state, token, caches):
    return decode_step(nnx.merge(graphdef, state), token, caches)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _bigram_logits(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)[:, -1]


def stream_tokens(model, prompt_ids, key: jax.Array, *, num_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None) -> Iterator[int]:
    """Yield num_tokens sampled token ids one at a time, with the cached decoder (prefill,
    decode_step).

    Attention layers keep a KV cache, Grassmann layers a window of max(offsets) reduced states.
    Learned position embeddings end at block_size, so when the cache is full the last
    block_size // 2 tokens are prefilled again (nanoGPT crops its context the same way, but
    recomputes every token).
    """
    graphdef, state = nnx.split(model)
    block = model.cfg.block_size
    bigram = isinstance(model, BigramLanguageModel)  # its next token depends on the last one only
    draw = functools.partial(_draw, temperature=float(temperature), top_k=top_k)
    context = list(int(t) for t in prompt_ids[-block:])
    if not bigram:
        logits, caches = _prefill(graphdef, state, jnp.asarray([context], jnp.int32),
                                  max_len=block)
        pos = len(context)
    for _ in range(num_tokens):
        if bigram:
            logits = _bigram_logits(graphdef, state, jnp.asarray([[context[-1]]], jnp.int32))
        key, sub = jax.random.split(key)
        token = int(draw(logits, sub)[0])
        context.append(token)
        yield token
        if bigram:
            continue
        if pos == block:  # the position embeddings end here: start again from the recent half
            context = context[-(block // 2):]
            logits, caches = _prefill(graphdef, state, jnp.asarray([context], jnp.int32),
                                      max_len=block)
            pos = len(context)
        else:
            logits, caches = _decode(graphdef, state, jnp.asarray([token], jnp.int32), caches)
            pos += 1


SAMPLE_STATIC = ("graphdef", "num_tokens", "temperature", "top_k")


def sample_cached_program(graphdef, state, prompt, key, *, num_tokens, temperature, top_k):
    """`sample_cached`'s program, to jit (`graphdef` and the keywords static) with other compiler
    options."""
    model = nnx.merge(graphdef, state)
    block, (B, P) = model.cfg.block_size, prompt.shape
    half = block // 2
    # at least `half` long: the refill slices that many (it runs only once the cache is full)
    buf = jnp.zeros((B, max(P + num_tokens, half)), jnp.int32).at[:, :P].set(prompt)
    logits, caches = prefill(model, prompt, block)

    def body(i, carry):  # draws the token at position P + i
        buf, logits, caches, pos, key = carry
        key, sub = jax.random.split(key)
        token = sample_logits(logits, sub, temperature=temperature, top_k=top_k).astype(jnp.int32)
        buf = buf.at[:, P + i].set(token)

        def refill(_):  # the position embeddings end here: start again from the recent half
            recent = jax.lax.dynamic_slice_in_dim(buf, P + i + 1 - half, half, axis=1)
            return (*prefill(model, recent, block), jnp.int32(half))

        def decode(_):
            return (*decode_step(model, token, caches), pos + 1)

        logits, caches, pos = jax.lax.cond(pos == block, refill, decode, None)
        return buf, logits, caches, pos, key

    carry = (buf, logits, caches, jnp.int32(P), key)
    return jax.lax.fori_loop(0, num_tokens, body, carry)[0][:, P:P + num_tokens]


_sample_cached = jax.jit(sample_cached_program, static_argnames=SAMPLE_STATIC)


def sample_cached(model, prompt_ids, key: jax.Array, *, num_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None) -> jax.Array:
    """The tokens `stream_tokens` yields, as one compiled program: (B, num_tokens) after (B, P).

    For a sample during training: the cached decoder (constant cost per token), with the recent half
    prefilled again whenever the cache fills up, for as many tokens as asked.
    """
    graphdef, state = nnx.split(model)
    prompt = jnp.asarray(prompt_ids, jnp.int32)[:, -model.cfg.block_size:]
    return _sample_cached(graphdef, state, prompt, key, num_tokens=int(num_tokens),
                          temperature=float(temperature), top_k=top_k)


def cache_bytes(model: nnx.Module, batch: int, context: int) -> int:
    """Bytes of generation state for `batch` texts of `context` tokens (all blocks; 0 for the
    bigram).

    Attention: K and V for every position, 2 * layers * batch * context * C * itemsize.
    Grassmann: the last max(offsets) reduced states, layers * batch * max(offsets) * r * itemsize,
    whatever the context. Plus 4 bytes per block for the position counter.
    """
    if isinstance(model, BigramLanguageModel):
        return 0
    # shapes only, nothing allocated
    shapes = jax.eval_shape(lambda: init_caches(model, batch, context))
    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize
               for leaf in jax.tree_util.tree_leaves(shapes))
