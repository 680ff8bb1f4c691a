"""One-position (streaming) versions of the mixers, as pure JAX functions.

Generation feeds one token at a time. Causal Grassmann mixing at position t
reads only z_t and the partners z_{t-δ}, so a layer needs to remember just the
last max(W) reduced states: a fixed-size window, whatever the context length.
Attention instead reads every earlier key and value; its per-step function
attends one query to a key/value cache masked to the filled positions.

Window layout: (..., M, r) with M = max(offsets), oldest first, so the last
row is z_{t-1} and z_{t-δ} sits at row M - δ (a static slice, no gather).
Rows for positions before 0 are zeros and masked by `pos >= δ`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from grassjax.functional.attention import scaled_dot_product_attention
from grassjax.functional.grassmann import check_offsets, gate, grassmann_feature, rescale


def grassmann_window_size(offsets: Sequence[int]) -> int:
    """M = max(offsets): how many past reduced states a streaming layer keeps."""
    return max(check_offsets(offsets))


def init_grassmann_window(batch_shape: Sequence[int], offsets: Sequence[int], rank: int,
                          dtype=jnp.float32) -> jax.Array:
    """Empty window of past reduced states, (*batch_shape, max(offsets), rank)."""
    return jnp.zeros((*batch_shape, grassmann_window_size(offsets), rank), dtype)


def grassmann_window_from_states(z: jax.Array, offsets: Sequence[int]) -> jax.Array:
    """The window after a prefix: the last max(offsets) rows of z (..., T, r), zero-padded in front if T < M."""
    M, T = grassmann_window_size(offsets), z.shape[-2]
    if T >= M:
        return z[..., T - M :, :]
    pad = [(0, 0)] * (z.ndim - 2) + [(M - T, 0), (0, 0)]
    return jnp.pad(z, pad)


def push_grassmann_window(window: jax.Array, z_t: jax.Array) -> jax.Array:
    """Drop the oldest state, append z_t: (..., M, r), (..., r) -> (..., M, r)."""
    return jnp.concatenate([window[..., 1:, :], z_t[..., None, :].astype(window.dtype)], axis=-2)


def grassmann_mix_step(
    h_t: jax.Array,
    window: jax.Array,
    pos: jax.Array,
    *,
    w_red: jax.Array,
    b_red: jax.Array,
    w_plu: jax.Array,
    b_plu: jax.Array,
    w_gate: jax.Array,
    b_gate: jax.Array,
    offsets: Sequence[int],
    eps: float = 1e-6,
    partner_mix: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`grassmann_mix` at the single position `pos`, from the window of earlier reduced states.

    Same maths, same operation order as `grassmann_mix` (wedge collapse), so
    it matches that function's row `pos` to rounding.

    Args:
      h_t: (..., d) hidden state at position pos.
      window: (..., M, r) reduced states z_{pos-M} .. z_{pos-1}, oldest first
        (M = max(offsets); rows before position 0 are ignored).
      pos: int scalar (may be traced), the position of h_t.
      w_red ... b_gate, offsets, eps, partner_mix: as in `grassmann_mix`.

    Returns:
      (out_t (..., d), new window (..., M, r)) -- the window now ends with z_pos.
    """
    offsets = check_offsets(offsets)
    M = max(offsets)
    if window.shape[-2] != M:
        raise ValueError(f"window holds {window.shape[-2]} states, offsets {offsets} need max(offsets) = {M}")
    z = h_t @ w_red + b_red  # (..., r)
    acc = jnp.promote_types(z.dtype, jnp.float32)  # as grassmann_mix: directions and w in >= float32
    u, _ = rescale(z.astype(acc))  # (..., r)
    past, _ = rescale(window.astype(acc))  # (..., M, r)
    partners = jnp.stack([past[..., M - delta, :] for delta in offsets], axis=-2)  # z_{pos-δ}: (..., m, r)
    valid = pos >= jnp.asarray(offsets)  # (m,): the partner t - δ exists
    g, _, _ = grassmann_feature(u, partners, valid, w_plu=w_plu, b_plu=b_plu, eps=eps, dtype=z.dtype,
                                partner_mix=partner_mix)
    out, _ = gate(h_t, g.astype(h_t.dtype), w_gate, b_gate)
    return out, push_grassmann_window(window, z)


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
    out = scaled_dot_product_attention(q_t[..., None, :, :], k_cache, v_cache, causal=False, mask=visible,
                                       scale=scale)  # (..., 1, H, D)
    return out[..., 0, :, :]
