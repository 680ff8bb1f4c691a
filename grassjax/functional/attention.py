"""Causal attention and the running-mean trick, as pure JAX functions.

Layout follows `jax.nn.dot_product_attention`: queries, keys and values are
(..., T, H, D) -- any leading batch dims, then time, heads, head size.
Attention weights, when asked for, are (..., H, T, T) with rows = queries.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def causal_average(x: jax.Array) -> jax.Array:
    """Running mean over the time axis (-2): out[t] = mean(x[0..t]).

    The "bag of words" trick: one matmul with a row-normalised lower-triangular
    matrix instead of a Python loop over t.

    Args:
      x: (..., T, C).
    Returns:
      (..., T, C), same dtype as x.
    """
    T = x.shape[-2]
    tril = jnp.tril(jnp.ones((T, T), dtype=jnp.float32))
    weights = (tril / tril.sum(axis=-1, keepdims=True)).astype(x.dtype)  # (T, T)
    return jnp.einsum("ts,...sc->...tc", weights, x)


def causal_mask(T: int, S: int | None = None) -> jax.Array:
    """Boolean (T, S) mask, True where query t may see key s (s <= t)."""
    S = T if S is None else S
    return jnp.tril(jnp.ones((T, S), dtype=bool), k=S - T)


def attention_logits(q: jax.Array, k: jax.Array, *, scale: float | None = None) -> jax.Array:
    """Scaled dot products, before any mask.

    Args:
      q: (..., T, H, D); k: (..., S, H, D).
    Returns:
      (..., H, T, S) in float32 or wider (logit growth is a stability signal, so keep precision).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dtype = jnp.promote_types(jnp.result_type(q, k), jnp.float32)  # at least float32
    logits = jnp.einsum("...thd,...shd->...hts", q, k, preferred_element_type=dtype)
    return logits * scale


def _combined_mask(T: int, S: int, causal: bool, mask: jax.Array | None) -> jax.Array | None:
    combined = causal_mask(T, S) if causal else None
    if mask is not None:
        combined = mask if combined is None else jnp.logical_and(combined, mask)
    return combined


def scaled_dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    mask: jax.Array | None = None,
    scale: float | None = None,
    return_weights: bool = False,
    implementation: str | None = None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
):
    """Multi-head scaled dot-product attention.

    Args:
      q: (..., T, H, D) queries.
      k: (..., S, H, D) keys.
      v: (..., S, H, D) values.
      causal: query t attends to keys s <= t (keys aligned to the end when S > T).
      mask: optional boolean mask broadcastable to (..., H, T, S); True = keep.
      scale: logit scale, default 1/sqrt(D).
      return_weights: also return the (..., H, T, S) attention weights. This
        path is written out explicitly; without it we call
        `jax.nn.dot_product_attention`, which picks fused kernels (cuDNN) where
        the backend has them.
      implementation: passed to `jax.nn.dot_product_attention` ("xla", "cudnn"
        or None); ignored when return_weights is True. With None, plain causal
        self-attention on the CPU backend runs `_causal_attention_heads_first`
        instead: the same maths as jax.nn's XLA path, laid out (B, H, T, D),
        which XLA:CPU runs faster forward + backward (compare the `attention`
        and `attention_jax_nn` rows of the benchmark_scaling experiment).
      dropout_rate, dropout_key: dropout on the attention probabilities (as nanoGPT's
        attn_dropout): each is zeroed with probability dropout_rate and the rest scaled by
        1 / (1 - rate). Off unless both are given; with it, the probabilities are computed
        explicitly (jax.nn has no dropout). Returned weights are the probabilities before dropout.

    Returns:
      out (..., T, H, D), or (out, weights) when return_weights is True.
      Rows with no visible key (only possible with a custom mask) are all zero.
    """
    T, S = q.shape[-3], k.shape[-3]
    full_mask = _combined_mask(T, S, causal, mask)  # (..., T, S) or None
    drop = (dropout_rate, dropout_key) if dropout_rate > 0 and dropout_key is not None else None
    if return_weights or (drop and not (causal and mask is None and T == S)):
        out, weights = _explicit_attention(q, k, v, full_mask, scale, drop)
        return (out, weights) if return_weights else out
    # jax.nn.dot_product_attention wants exactly (B, T, H, D): fold leading dims.
    lead, H = q.shape[:-3], q.shape[-2]
    q4, k4, v4 = (a.reshape((-1,) + a.shape[-3:]) for a in (q, k, v))
    plain_causal = causal and mask is None and T == S  # lets the kernel build the mask itself
    if plain_causal and (drop or (implementation is None and jax.default_backend() == "cpu")):
        out = _causal_attention_heads_first(q4, k4, v4, scale, drop)
        return out.reshape(q.shape[:-1] + (v.shape[-1],))
    mask4 = None
    if full_mask is not None and not plain_causal:
        mask4 = jnp.broadcast_to(full_mask, lead + (H, T, S)).reshape((-1, H, T, S))
    out = jax.nn.dot_product_attention(
        q4, k4, v4, mask=mask4, scale=scale, is_causal=plain_causal, implementation=implementation
    )  # (B, T, H, D)
    if mask4 is not None:
        # jax.nn masks with a large finite negative, so a row with no visible key averages every
        # value, future ones included. Zero it, as documented (plain causal rows always see
        # themselves).
        has_key = jnp.any(mask4, axis=-1)  # (B, H, T)
        out = jnp.where(jnp.swapaxes(has_key, -1, -2)[..., None], out, 0)
    return out.reshape(q.shape[:-1] + (v.shape[-1],))


def _attention_dropout(probs: jax.Array, drop) -> jax.Array:
    """probs with each entry zeroed with probability `rate`, the rest scaled by 1 / (1 - rate)."""
    rate, key = drop
    keep = jax.random.bernoulli(key, 1.0 - rate, probs.shape)
    return jnp.where(keep, probs / (1.0 - rate), 0).astype(probs.dtype)


def _causal_attention_heads_first(q, k, v, scale, drop=None):
    """Causal softmax attention on (B, T, H, D), computed in (B, H, T, D) layout.

    Mirrors jax.nn.dot_product_attention's XLA implementation (logits in at
    least float32, scaled after the product, masked with the same large
    negative number, softmax in float32, probabilities cast to the value
    dtype) but transposes to heads-first once, so that every product in the
    forward and backward pass is a plain batched matmul over (B, H).
    """
    T, D = q.shape[-3], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    qh, kh, vh = (jnp.swapaxes(a, -3, -2) for a in (q, k, v))  # (B, H, T, D)
    logits = jnp.einsum("bhtd,bhsd->bhts", qh, kh, preferred_element_type=logits_dtype)
    logits = logits * jnp.asarray(scale, logits_dtype)
    large_negative = jnp.asarray(-0.7 * jnp.finfo(logits_dtype).max, logits_dtype)
    logits = jnp.where(np.tril(np.ones((T, T), dtype=bool)), logits, large_negative)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(k.dtype)
    if drop is not None:
        probs = _attention_dropout(probs, drop)
    out = jnp.einsum("bhts,bhsd->bhtd", probs, vh)
    return jnp.swapaxes(out, -3, -2)  # (B, T, H, D)


def _explicit_attention(q, k, v, mask, scale, drop=None):
    logits = attention_logits(q, k, scale=scale)  # (..., H, T, S) float32
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    # Softmax that yields zeros (not NaN) for fully masked rows.
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    unnorm = jnp.exp(logits - jax.lax.stop_gradient(row_max))
    denom = jnp.sum(unnorm, axis=-1, keepdims=True)
    weights = unnorm / jnp.where(denom > 0, denom, 1.0)
    used = weights if drop is None else _attention_dropout(weights, drop)
    out = jnp.einsum("...hts,...shd->...thd", used.astype(v.dtype), v)
    return out, weights


def attention_step(q_t: jax.Array, k_cache: jax.Array, v_cache: jax.Array, pos: jax.Array, *,
                   scale: float | None = None) -> jax.Array:
    """Causal attention for the single query at position `pos`, against a key/value cache.

    Args:
      q_t: (..., H, D) query at position pos.
      k_cache, v_cache: (..., S, H, D); rows 0..pos are filled (row pos is this
        token's own key/value), later rows are ignored.
      pos: int scalar (may be traced).
    Returns:
      (..., H, D).
    """
    S = k_cache.shape[-3]
    visible = (jnp.arange(S) <= pos)[None, :]  # (T=1, S): keys at positions <= pos
    out = scaled_dot_product_attention(q_t[..., None, :, :], k_cache, v_cache, causal=False,
                                       mask=visible, scale=scale)  # (..., 1, H, D)
    return out[..., 0, :, :]
