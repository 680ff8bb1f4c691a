"""Statistics of attention and Grassmann mixing, from the intermediates the mixers return.

Pure JAX, vectorised over batch, heads and layers: nothing here loops in
Python over heads or positions, so it all runs inside a jitted eval step.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from grassjax.functional.grassmann import direction, normalized_partner, rescale, shifted_partners


def attention_row_entropy(weights: jax.Array) -> jax.Array:
    """Entropy of each causal row, normalised by log(number of visible keys).

    Row t sees t + 1 keys, so its entropy is at most log(t + 1): 1 means
    uniform over the visible prefix, 0 means all weight on one key (Zhai et
    al., 2023). Row 0 has a single key and is defined as 0.

    Args:
      weights: (..., T, T) causal attention weights, rows summing to 1.
    Returns:
      (..., T) normalised entropies.
    """
    T = weights.shape[-1]
    plogp = jnp.where(weights > 0, weights * jnp.log(jnp.where(weights > 0, weights, 1.0)), 0.0)
    entropy = -plogp.sum(-1)  # (..., T)
    max_entropy = jnp.log(jnp.arange(1, T + 1, dtype=weights.dtype))
    return jnp.where(max_entropy > 0, entropy / jnp.where(max_entropy > 0, max_entropy, 1.0), 0.0)


def attention_stats(weights: jax.Array, max_logit: jax.Array | None = None) -> dict[str, jax.Array]:
    """Per-head summaries of causal attention weights, averaged over batch and rows.

    Args:
      weights: (B, H, T, T).
      max_logit: optional (B, H) maximum pre-softmax logit.
    Returns:
      dict of (H,) arrays:
        entropy      mean normalised row entropy (rows 1..T-1; row 0 has one key),
        distance     mean attention distance E|i - j| in tokens,
        self_weight  mean weight on the current token,
        max_logit    max pre-softmax logit (if given).
    """
    T = weights.shape[-1]
    dist = jnp.abs(jnp.arange(T)[:, None] - jnp.arange(T)[None, :]).astype(weights.dtype)  # (T, T)
    reduce = lambda a: a.mean(axis=tuple(i for i in range(a.ndim) if i != 1))  # keep the head axis
    entropy = attention_row_entropy(weights)[..., 1:] if T > 1 else jnp.zeros(weights.shape[:-1])
    stats = {
        "entropy": reduce(entropy),
        "distance": reduce((weights * dist).sum(-1)),
        "self_weight": reduce(jnp.diagonal(weights, axis1=-2, axis2=-1)),
    }
    if max_logit is not None:
        stats["max_logit"] = max_logit.max(axis=0)
    return stats


def offset_alignment(z: jax.Array, w: jax.Array, valid: jax.Array, offsets: Sequence[int],
                     eps: float = 1e-6) -> jax.Array:
    """How much each offset's plane agrees with the aggregated plane, per position.

    g_t is a projection of m_t = mean_δ p̂_t^δ = a_t ∧ w_t (a_t = z_t/‖z_t‖).
    Offset δ's share at t is |<p̂_t^δ, m_t>| normalised over the valid
    offsets: an offset whose plane is orthogonal to the mean contributes
    nothing to it. p̂_t^δ = a_t ∧ d̂_t^δ is rebuilt exactly as the mixer builds
    it (same eps rule), and the inner product of two wedges costs O(r)
    (Binet-Cauchy): <a ∧ b, c ∧ d> = (a·c)(b·d) - (a·d)(b·c).

    Args:
      z: (..., T, r) reduced states; w: (..., T, r) collapsed partners;
      valid: (T, m); offsets: the m offsets; eps: the mixer's eps.
    Returns:
      (..., T, m) shares, summing to 1 over valid offsets (0 where none is valid).
    """
    u, _ = rescale(z.astype(w.dtype))  # (..., T, r)
    a = direction(u)
    # (..., T, m, r)
    d_hat, _ = normalized_partner(u[..., None, :], shifted_partners(u, offsets), eps)
    aw = jnp.sum(a * w, -1)[..., None]  # (..., T, 1)
    inner = (jnp.sum(a * a, -1)[..., None] * jnp.sum(d_hat * w[..., None, :], -1)
             - aw * jnp.sum(d_hat * a[..., None, :], -1))
    scores = jnp.where(valid, jnp.abs(inner), 0.0)  # (..., T, m)
    total = scores.sum(-1, keepdims=True)
    return jnp.where(total > 0, scores / jnp.where(total > 0, total, 1.0), 0.0)


def grassmann_stats(intermediates: dict[str, jax.Array], offsets: Sequence[int], *,
                    eps: float = 1e-6, hist_bins: int = 20) -> dict[str, jax.Array]:
    """Scalar and small-vector summaries of one Grassmann layer.

    Args:
      intermediates: from grassmann_mix(..., return_intermediates=True).
      offsets: that layer's offsets.
    Returns:
      dict with
        gate_mean, gate_std        α over batch, positions and channels,
        gate_hist                  (hist_bins,) counts of α in [0, 1],
        z_norm_mean, z_norm_std    ‖z_t‖,
        plucker_norm_mean/_std     ‖z_t ∧ z_{t-δ}‖ over valid pairs,
        offset_share               (m,) mean share of each offset (see offset_alignment),
        zero_g_fraction            fraction of positions with no valid offset (g = 0).
    """
    alpha = intermediates["alpha"].astype(jnp.float32)
    valid = intermediates["valid"]
    z_norm = jnp.linalg.norm(intermediates["z"].astype(jnp.float32), axis=-1)
    norms = intermediates["plucker_norm"]
    mask = jnp.broadcast_to(valid, norms.shape)
    count = jnp.maximum(mask.sum(), 1)
    pn_mean = jnp.where(mask, norms, 0.0).sum() / count
    pn_std = jnp.sqrt(jnp.where(mask, (norms - pn_mean) ** 2, 0.0).sum() / count)
    share = offset_alignment(intermediates["z"], intermediates["w"], valid, offsets, eps)
    any_valid = valid.any(-1)  # (T,)
    flat = share.reshape((-1,) + share.shape[-2:])  # (N, T, m)
    # Over positions with g != 0.
    share_mean = flat.sum((0, 1)) / jnp.maximum(flat.shape[0] * any_valid.sum(), 1)
    return {
        "gate_mean": alpha.mean(),
        "gate_std": alpha.std(),
        "gate_hist": jnp.histogram(alpha, bins=hist_bins, range=(0.0, 1.0))[0],
        "z_norm_mean": z_norm.mean(),
        "z_norm_std": z_norm.std(),
        "plucker_norm_mean": pn_mean,
        "plucker_norm_std": pn_std,
        "offset_share": share_mean,
        "zero_g_fraction": 1.0 - any_valid.mean(),
    }


def offset_share_map(intermediates: dict[str, jax.Array], offsets: Sequence[int],
                     eps: float = 1e-6) -> jax.Array:
    """(T, m) map of how much position t draws on each offset, averaged over the batch."""
    share = offset_alignment(intermediates["z"], intermediates["w"], intermediates["valid"],
                             offsets, eps)
    return share.reshape((-1,) + share.shape[-2:]).mean(0)
