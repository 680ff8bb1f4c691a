"""Causal Grassmann mixing (arXiv 2512.19428) as pure JAX functions.

For hidden states h_t (t = 0..T-1) and a set of offsets W:

  z_t   = h_t W_red + b_red                          reduce d -> r
  p_t^δ = z_t ∧ z_{t-δ}                              Plücker coordinates, r(r-1)/2 of them
  p̂_t^δ = p_t^δ / max(‖p_t^δ‖, eps ‖z_t‖ ‖z_{t-δ}‖)   eps is relative (see below)
  g_t   = mean over valid δ of (p̂_t^δ W_plu + b_plu)  valid: t - δ >= 0
  α_t   = sigmoid([h_t; g_t] W_gate + b_gate)
  out_t = α_t * h_t + (1 - α_t) * g_t

Two choices the paper leaves open, made as every public reproduction does:
  * causality is backward: position t pairs with t - δ, never t + δ;
  * a position with no valid offset (t < min W) gets g_t = 0.

Degenerate pairs. ‖p‖ = ‖z_t‖ ‖z_{t-δ}‖ sin θ, so the relative eps floors sin θ,
the angle between the two states: a pair with sin θ < eps (nearly parallel,
repeated, or containing a zero state) has no well-defined plane, and it
contributes a vector of length sin θ / eps < 1 that fades to exactly 0 for
exactly parallel or zero states. p̂ therefore depends only on the directions,
and every path computes it from u = z_t, v = z_{t-δ} rescaled by powers of two
(exact, and no square can overflow):

  d = v - (u·v / u·u) u,  sin θ = ‖d‖ / ‖v‖,
  p̂ = u/‖u‖ ∧ d̂,  d̂ = (d/‖v‖) / max(sin θ, eps)

since u ∧ v = u ∧ d. The Gram-Schmidt residual d keeps the digits that the
Lagrange identity ‖u∧v‖² = ‖u‖²‖v‖² - (u·v)² cancels away, and it is exactly
0 for repeated states. Error bound: in float32 each p̂ is within about
r·ε_mach / max(sin θ, eps) of the exact value for the same z (ε_mach = 2^-24),
so g is within ‖W_plu‖₂ times that (plus the rounding of the projection);
tests/test_numerics.py holds every path to it against a float64 oracle.
Gradients are finite everywhere, and at most ~1/(eps ‖z‖) near degenerate pairs.

`grassmann_mix_reference` computes all this literally, with explicit
coordinates and norms per offset. `grassmann_mix` uses the wedge-collapse
identity: u/‖u‖ is common to every pair and the wedge is bilinear, so

  mean_δ p̂_t^δ = z_t/‖z_t‖ ∧ w_t,   w_t = mean_δ d̂_t^δ

and one projection replaces |W| of them, with O(r) work per pair.

Order-keeping variant (`partner_mix`, one r x r matrix M_δ per offset): the mean over
offsets forgets which partner came from which offset -- a ∧ (d̂^1 + d̂^2) cannot tell
"x then y" from "y then x" once the two are summed. Mixing each normalised partner by its
own matrix before the sum,

  w_t = mean_δ d̂_t^δ M_δ        (row vectors, x @ M)

keeps the collapse exact, because the wedge is linear in its second argument:
mean_δ a ∧ (d̂^δ M_δ) = a ∧ w_t, so it is still one projection. Each offset now writes
into its own part of the Plücker space; with every M_δ = I it is the paper's layer.
‖d̂^δ‖ <= 1, so the mixed partners stay bounded by ‖M_δ‖ for nearly parallel pairs too.
Cost: m r² extra parameters and an (m, r) x (r, r) product per position, small next to
the r² d projection.

Weights: one `GrassmannWeights` bundle (x @ W convention, like Flax's Linear kernels):
  w_red (d, r), b_red (r,), w_plu (r(r-1)/2, d), b_plu (d,),
  w_gate (2d, d) acting on [h; g], b_gate (d,), and the optional partner_mix (m, r, r).

Streaming (generation): `grassmann_mix_step` is the same layer at one position. Position t
reads only z_t and the partners z_{t-δ}, so it needs the last max(offsets) reduced states,
a fixed-size window whatever the context: (..., M, r) with M = max(offsets), oldest first,
so z_{t-δ} sits at row M - δ (a static slice).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class GrassmannWeights(NamedTuple):
    """The parameters of one Grassmann layer (a pytree); shapes in the module docstring.

    partner_mix (m, r, r), one matrix M_δ per entry of offsets, selects the order-keeping variant;
    None is the paper's layer.
    """

    w_red: jax.Array
    b_red: jax.Array
    w_plu: jax.Array
    b_plu: jax.Array
    w_gate: jax.Array
    b_gate: jax.Array
    partner_mix: jax.Array | None = None

    @classmethod
    def of(cls, weights: "GrassmannWeights | None" = None, **arrays) -> "GrassmannWeights":
        """`weights`, or the bundle of keyword arrays w_red=..., b_gate=... (and partner_mix=...).

        The mixing functions take either form: weights=GrassmannWeights(...) or the six arrays
        as keywords.
        """
        if weights is None:
            return cls(**arrays)
        if arrays.get("partner_mix") is not None:  # partner_mix=M next to a bundle without one
            weights = weights._replace(partner_mix=arrays.pop("partner_mix"))
        arrays.pop("partner_mix", None)
        if arrays:
            raise TypeError("pass the weights either as a GrassmannWeights or as keywords, "
                            f"not both: {sorted(arrays)}")
        return weights


def num_plucker_coords(r: int) -> int:
    """r(r-1)/2: the number of Plücker coordinates of a 2-plane in R^r."""
    return r * (r - 1) // 2


@jax.jit
def plucker(u: jax.Array, v: jax.Array) -> jax.Array:
    """Plücker coordinates p_ij = u_i v_j - u_j v_i of span(u, v), for i < j.

    Order is row-major over i < j: (0,1), (0,2), ..., (0,r-1), (1,2), ..., (r-2,r-1).

    Differentiable in both modes, with a custom JVP whose transpose (the
    reverse-mode derivative) is one gather and two small contractions instead
    of the 2(r-1) pad-and-add terms autodiff derives from the slices below.

    XLA:CPU contracts u_i v_j - u_j v_i into a fused multiply-add, so the
    coordinates of two parallel vectors come out as rounding noise (~ε|u||v|)
    rather than 0. The mixers never divide such noise by eps: they take the
    coordinates of (z_t/‖z_t‖) ∧ d with d the exact residual (see module docstring).

    Args:
      u, v: (..., r), broadcastable against each other.
    Returns:
      (..., r(r-1)/2).
    """
    u, v = jnp.broadcast_arrays(u, v)
    return _plucker(u, v)


def _plucker_slices(u: jax.Array, v: jax.Array) -> jax.Array:
    r = u.shape[-1]
    # One slice pair per row i instead of an index gather: XLA fuses these into
    # a single elementwise loop.
    rows = [u[..., i : i + 1] * v[..., i + 1 :] - v[..., i : i + 1] * u[..., i + 1 :]
            for i in range(r - 1)]
    if not rows:
        return jnp.zeros(u.shape[:-1] + (0,), u.dtype)
    return jnp.concatenate(rows, axis=-1)


@functools.lru_cache(maxsize=None)
def _antisymmetric_tables(r: int) -> tuple[np.ndarray, np.ndarray]:
    """For the flattened r x r matrix: coordinate index k(i, j) of the pair {i, j}, and sign
    +1 (i<j), -1 (i>j), 0."""
    i, j = np.triu_indices(r, 1)
    index = np.zeros((r, r), np.int32)
    sign = np.zeros((r, r), np.float32)
    index[i, j] = index[j, i] = np.arange(len(i))
    sign[i, j], sign[j, i] = 1.0, -1.0
    return index.reshape(-1), sign.reshape(-1)


@jax.custom_jvp
def _plucker(u, v):
    return _plucker_slices(u, v)


@_plucker.defjvp
def _plucker_jvp(primals, tangents):
    """d(u ∧ v) = du ∧ v + u ∧ dv, written so that its transpose is cheap.

    With N = du vᵀ + u dvᵀ (..., r, r), dp_k = N_ij - N_ji for k = (i < j): a
    scatter-add of the signed entries of N onto the coordinates. Reverse mode
    transposes that scatter into a gather (dN_ij = ±dp_k(i,j)) followed by two
    dense contractions (du = dN v, dv = dNᵀ u). Differentiating the slices
    directly gives a sum of 2(r-1) padded terms per output, which is slow on CPU.
    """
    u, v = primals
    du, dv = tangents
    p = _plucker(u, v)
    r = u.shape[-1]
    if r < 2:
        return p, jnp.zeros_like(p)
    index, sign = _antisymmetric_tables(r)
    outer = jnp.einsum("...i,...j->...ij", du, v) + jnp.einsum("...i,...j->...ij", u, dv)
    signed = outer.reshape(outer.shape[:-2] + (r * r,)) * jnp.asarray(sign, outer.dtype)
    dp = jnp.zeros(p.shape, signed.dtype).at[..., index].add(signed)
    return p, dp.astype(p.dtype)


def rescale(u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """u scaled by a power of two so that max|u| lies in [1/2, 1) (0 for u = 0), and that
    scale (..., 1).

    Scaling by a power of two is exact, so equal (or opposite) rows stay
    exactly equal (or opposite) wherever XLA computes them (a division would
    not: XLA:CPU may turn it into a multiply by a rounded reciprocal). No later
    square overflows or underflows, whatever the scale of u.
    """
    # Everything built from the rescaled vectors is invariant to the scale, so its gradient may
    # treat it as constant.
    max_abs = jax.lax.stop_gradient(jnp.max(jnp.abs(u), axis=-1, keepdims=True))
    _, exponent = jnp.frexp(max_abs)  # max_abs = m 2^e, m in [1/2, 1); e = 0 for 0
    scale = jnp.ldexp(jnp.ones_like(max_abs), exponent)
    return u * jnp.ldexp(jnp.ones_like(max_abs), -exponent), scale


def vector_norm(u: jax.Array) -> jax.Array:
    """‖u‖ over the last axis, (..., 1), with a finite gradient at u = 0."""
    return safe_sqrt(jnp.sum(u * u, axis=-1, keepdims=True))


def orthogonal_residual(u: jax.Array, v: jax.Array) -> jax.Array:
    """d = v - (u·v / u·u) u: the part of v orthogonal to u, so that u ∧ v = u ∧ d.

    For rescaled u, v (see `rescale`). Computed as c - (u·c / u·u) u with
    c = v ∓ u (the sign of u·v): the same vector, but c is exact for nearly
    parallel states and exactly 0 for repeated (or negated) ones, so they span
    exactly no plane. A zero u gives d = v.
    """
    c = v - jnp.where(jnp.sum(u * v, axis=-1, keepdims=True) < 0, -u, u)
    uu = jnp.sum(u * u, axis=-1, keepdims=True)
    return c - jnp.sum(u * c, axis=-1, keepdims=True) / jnp.where(uu > 0, uu, 1) * u


def normalized_partner(u: jax.Array, v: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """The partner d̂ with p̂(u, v) = u/‖u‖ ∧ d̂, and sin θ, for rescaled u, v.

    sin θ = ‖u ∧ v‖ / (‖u‖ ‖v‖) and d̂ = (d / ‖v‖) / max(sin θ, eps) with
    d = `orthogonal_residual`(u, v): the relative eps rule of the module
    docstring. Zero vectors give d̂ = 0.

    Args:
      u: (..., r); v: (..., r), broadcastable.
    Returns:
      (d̂ (..., r), sin θ (...,)).
    """
    v_len = vector_norm(v)
    d = orthogonal_residual(u, v) / jnp.where(v_len > 0, v_len, 1)  # ‖d‖ = sin θ
    sin = vector_norm(d)
    return d / jnp.maximum(sin, eps), sin[..., 0]


def direction(u: jax.Array) -> jax.Array:
    """u / ‖u‖ for a rescaled u (0 for u = 0)."""
    length = vector_norm(u)
    return u / jnp.where(length > 0, length, 1)


@jax.jit
def plucker_norm(u: jax.Array, v: jax.Array) -> jax.Array:
    """‖u ∧ v‖ = ‖u‖ ‖v‖ sin θ in O(r), accurate to ~ε_mach ‖u‖ ‖v‖.

    Computed from the Gram-Schmidt residual of the rescaled vectors, not the
    Lagrange identity ‖u‖²‖v‖² - (u·v)², which cancels half the digits away
    for nearly parallel vectors and overflows for large ones.

    Args:
      u, v: (..., r).
    Returns:
      (...,), in float32 at least; exactly 0 when v is ±2^k u or either is 0.
    """
    dtype = jnp.promote_types(jnp.result_type(u, v), jnp.float32)
    (u, scale_u), (v, scale_v) = rescale(u.astype(dtype)), rescale(v.astype(dtype))
    _, sin = normalized_partner(u, v, 1.0)
    return (scale_u * vector_norm(u) * scale_v * vector_norm(v))[..., 0] * sin


def safe_sqrt(sq: jax.Array) -> jax.Array:
    """sqrt with a zero (not NaN or inf) gradient at 0: degenerate pairs have a zero residual."""
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def check_offsets(offsets: Sequence[int]) -> tuple[int, ...]:
    offsets = tuple(int(o) for o in offsets)
    if not offsets or min(offsets) < 1:
        raise ValueError(f"offsets must be a non-empty set of positive integers, got {offsets}")
    return offsets


def shift(x: jax.Array, delta: int, axis: int) -> jax.Array:
    """x[t - delta] along `axis`, zero-filled for t < delta (static delta)."""
    T = x.shape[axis]
    if delta >= T:
        return jnp.zeros_like(x)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (delta, 0)
    kept = jax.lax.slice_in_dim(x, 0, T - delta, axis=axis)
    return jnp.pad(kept, pad)


def shifted_partners(x: jax.Array, offsets: Sequence[int]) -> jax.Array:
    """(..., T, m, C): out[..., t, k, :] = x[..., t - offsets[k], :], zero where t < offsets[k]."""
    return jnp.stack([shift(x, delta, axis=-2) for delta in offsets], axis=-2)


def offset_validity(offsets: Sequence[int], T: int) -> np.ndarray:
    """(T, m) bool: True where position t has a partner t - offsets[k] >= 0."""
    return np.arange(T)[:, None] >= np.asarray(offsets)[None, :]


def gate(h: jax.Array, g: jax.Array, w_gate: jax.Array,
         b_gate: jax.Array) -> tuple[jax.Array, jax.Array]:
    """α = sigmoid([h; g] W_gate + b_gate); returns (α h + (1 - α) g, α)."""
    # Two matmuls instead of one on the concatenation, which would be materialised.
    d = h.shape[-1]
    alpha = jax.nn.sigmoid(h @ w_gate[:d] + g @ w_gate[d:] + b_gate)
    return alpha * h + (1 - alpha) * g, alpha


def grassmann_feature(u: jax.Array, partners: jax.Array, valid, weights: GrassmannWeights, *,
                      eps: float, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """g = mean over valid δ of (p̂^δ W_plu + b_plu), by the wedge collapse: one projection
    for all offsets.

    Shared by `grassmann_mix` (all positions) and `grassmann_mix_step` (one position).

    Args:
      u: (..., r) z_t, rescaled (see `rescale`).
      partners: (..., m, r) z_{t-δ}, rescaled, one per offset.
      valid: (..., m) bool (NumPy or traced), whether z_{t-δ} exists.
      weights: w_plu and b_plu project; partner_mix, if any, is the order-keeping variant:
        d̂^δ -> d̂^δ M_δ before the mean.
      dtype: the dtype of the coordinates and the projection (z's dtype).
    Returns:
      g (..., d), 0 where no offset is valid; w (..., r), the collapsed partner
      (mean_δ p̂^δ = z_t/‖z_t‖ ∧ w); sin θ (..., m) per pair.
    """
    d_hat, sin = normalized_partner(u[..., None, :], partners, eps)  # (..., m, r), (..., m)
    partner_mix = weights.partner_mix
    if partner_mix is not None:  # order-keeping variant: each offset's partner through its own M_δ
        d_hat = jnp.einsum("...kr,krs->...ks", d_hat, partner_mix.astype(d_hat.dtype))
    num_valid = jnp.sum(valid, axis=-1, keepdims=True)  # (..., 1)
    w = jnp.sum(jnp.where(valid[..., None], d_hat, 0.0), axis=-2) / jnp.maximum(num_valid, 1)
    g = plucker(direction(u).astype(dtype), w.astype(dtype)) @ weights.w_plu + weights.b_plu
    return jnp.where(num_valid > 0, g, 0), w, sin


# Both mixing functions are jitted with static offsets: run eagerly, their
# per-offset Python loops would dispatch dozens of tiny ops one by one.
# Inside an outer jit this is a no-op.
_jit_mixer = functools.partial(jax.jit, static_argnames=("offsets", "eps", "return_intermediates"))


def grassmann_mix_reference(h: jax.Array, weights: GrassmannWeights | None = None, *,
                            offsets: Sequence[int], eps: float = 1e-6,
                            return_intermediates: bool = False, **weight_arrays):
    """Causal Grassmann mixing, computed literally: every offset, explicit coordinates.

    Slow (one r(r-1)/2 x d projection per offset); kept as the specification
    that `grassmann_mix` is tested against.

    Args:
      h: (..., T, d) hidden states.
      weights: a GrassmannWeights (or its arrays as keywords, w_red=..., partner_mix=...); see
        module docstring. partner_mix selects the order-keeping variant,
        g_t^δ = W_plu (a ∧ d̂^δ M_δ) + b_plu with a ∧ d̂^δ = p̂_t^δ.
      offsets: positive ints; position t pairs with t - δ. Repeats count twice
        in the mean, as in the paper's {1, 2, 4, 8, 8, 8}.
      eps: relative floor: p̂ = p / max(‖p‖, eps ‖z_t‖ ‖z_{t-δ}‖), i.e. on
        sin θ (module docstring: degenerate pairs fade to 0, gradients stay
        finite, and the float32 error bound).
      return_intermediates: also return a dict of intermediates.

    Returns:
      out (..., T, d), or (out, intermediates) -- see `grassmann_mix`.
    """
    weights = GrassmannWeights.of(weights, **weight_arrays)
    offsets = check_offsets(offsets)
    check_partner_mix(weights.partner_mix, offsets, weights.w_red.shape[-1])
    return _reference(h, weights, offsets=offsets, eps=eps,
                      return_intermediates=return_intermediates)


def check_partner_mix(partner_mix, offsets: Sequence[int], r: int) -> None:
    """partner_mix must be None or (len(offsets), r, r)."""
    if partner_mix is not None and tuple(partner_mix.shape) != (len(offsets), r, r):
        raise ValueError(f"partner_mix must be (len(offsets), r, r) = {(len(offsets), r, r)}, "
                         f"got {tuple(partner_mix.shape)}")


@_jit_mixer
def _reference(h, weights: GrassmannWeights, *, offsets, eps, return_intermediates):
    w_red, b_red, w_plu, b_plu, w_gate, b_gate, partner_mix = weights
    T = h.shape[-2]
    z = h @ w_red + b_red  # (..., T, r)
    valid = offset_validity(offsets, T)  # (T, m)
    acc = jnp.promote_types(z.dtype, jnp.float32)
    u, scale = rescale(z.astype(acc))  # (..., T, r), (..., T, 1)
    a, z_len = direction(u), scale * vector_norm(u)  # z_t/‖z_t‖, ‖z_t‖
    g_sum = jnp.zeros(h.shape, acc)
    norms = []
    for k, delta in enumerate(offsets):
        v = shift(u, delta, axis=-2)  # z_{t-δ}, rescaled
        v_len = vector_norm(v)
        # a ∧ d = a ∧ v/‖v‖, no cancellation
        d = orthogonal_residual(u, v) / jnp.where(v_len > 0, v_len, 1)
        # (..., T, P): the coordinates of z_t ∧ z_{t-δ}, divided by ‖z_t‖ ‖z_{t-δ}‖
        p = plucker(a, d)
        # (..., T, 1), the norm from the coordinates
        sin = safe_sqrt(jnp.sum(p * p, axis=-1, keepdims=True))
        p_hat = p / jnp.maximum(sin, eps)
        # Order-keeping variant: the plane of a and (d / max(sin, eps)) M_δ.
        if partner_mix is not None:
            p_hat = plucker(a, (d / jnp.maximum(sin, eps)) @ partner_mix[k].astype(acc))
        g_delta = p_hat @ w_plu.astype(acc) + b_plu  # (..., T, d)
        g_sum = g_sum + jnp.where(valid[:, k : k + 1], g_delta, 0.0)
        norms.append(jnp.where(valid[:, k], (sin * z_len * shift(z_len, delta, axis=-2))[..., 0],
                               0.0))
    num_valid = valid.sum(axis=1)[:, None]  # (T, 1)
    g = (g_sum / np.maximum(num_valid, 1)).astype(h.dtype)  # rows with no valid offset stay 0
    out, alpha = gate(h, g, w_gate, b_gate)
    if not return_intermediates:
        return out
    return out, dict(z=z, g=g, alpha=alpha, plucker_norm=jnp.stack(norms, -1),
                     valid=jnp.asarray(valid))


def grassmann_mix(h: jax.Array, weights: GrassmannWeights | None = None, *, offsets: Sequence[int],
                  eps: float = 1e-6, return_intermediates: bool = False, **weight_arrays):
    """Causal Grassmann mixing via the wedge-collapse identity.

    Same maths and arguments as `grassmann_mix_reference`, at
    O(T (m r + r² d)) instead of O(T m r² d) for m offsets.

    Args:
      h: (..., T, d) hidden states, float32 or bfloat16.
      weights: a GrassmannWeights, or its arrays as keywords (w_red=..., b_gate=...,
        partner_mix=...). With partner_mix (m, r, r): the order-keeping variant,
        w_t = mean_δ d̂_t^δ M_δ.
      offsets: positive ints (static). Position t pairs with t - δ.
      eps: relative floor on each Plücker norm, as in `grassmann_mix_reference`.
      return_intermediates: also return a dict with
        z (..., T, r)            reduced states,
        g (..., T, d)            aggregated Grassmann features (0 where no offset is valid),
        alpha (..., T, d)        gate values,
        plucker_norm (..., T, m) ‖z_t ∧ z_{t-δ}‖ per offset (0 where invalid),
        valid (T, m)             whether each offset is valid at t,
        w (..., T, r)            the collapsed partner: mean_δ p̂_t^δ = (z_t/‖z_t‖) ∧ w_t.

    Returns:
      out (..., T, d), or (out, intermediates).
    """
    weights = GrassmannWeights.of(weights, **weight_arrays)
    offsets = check_offsets(offsets)
    check_partner_mix(weights.partner_mix, offsets, weights.w_red.shape[-1])
    return _wedge_collapse(h, weights, offsets=offsets, eps=eps,
                           return_intermediates=return_intermediates)


@_jit_mixer
def _wedge_collapse(h, weights: GrassmannWeights, *, offsets, eps, return_intermediates):
    # Everything but the time shifts is per position, so it runs on (N, ...) with N = batch x T
    # rows: the same shapes (and the same XLA fusions, parallelised over N) whether the batch is
    # 16 x 256 or 1 x 4096.
    *lead, T, d = h.shape
    n = math.prod(lead)
    h2 = h.reshape(n * T, d)
    z = h2 @ weights.w_red + weights.b_red  # (N, r)
    r = z.shape[-1]
    acc = jnp.promote_types(z.dtype, jnp.float32)  # directions and w in >= float32
    u, scale = rescale(z.astype(acc))  # (N, r), (N, 1)
    valid_t = offset_validity(offsets, T)  # (T, m), static
    valid = np.tile(valid_t, (n, 1))  # (N, m)
    # All offsets at once (a handful of fused ops instead of a few per offset, forward and
    # backward): partners[row(b, t), k, :] = u_{b, t - δ_k}, zero where t < δ_k.
    partners = shifted_partners(u.reshape(n, T, r), offsets).reshape(n * T, len(offsets), r)
    g, w, sin = grassmann_feature(u, partners, valid, weights, eps=eps, dtype=z.dtype)
    g = g.astype(h.dtype)
    out, alpha = gate(h2, g, weights.w_gate, weights.b_gate)
    unflatten = lambda x: x.reshape(tuple(lead) + (T,) + x.shape[1:])
    if not return_intermediates:
        return unflatten(out)
    z_len = scale * vector_norm(u)  # (N, 1)
    partner_len = shifted_partners(z_len.reshape(n, T, 1), offsets).reshape(n * T, len(offsets))
    norm = jnp.where(valid, sin * z_len * partner_len, 0.0)  # ‖z_t ∧ z_{t-δ}‖
    return unflatten(out), dict(z=unflatten(z), g=unflatten(g), alpha=unflatten(alpha),
                                plucker_norm=unflatten(norm), valid=jnp.asarray(valid_t),
                                w=unflatten(w))


# --------------------------------------------------------------------------------------------------
# Streaming: one position at a time, from a window of the last max(offsets) reduced states


def grassmann_window_size(offsets: Sequence[int]) -> int:
    """M = max(offsets): how many past reduced states a streaming layer keeps."""
    return max(check_offsets(offsets))


def init_grassmann_window(batch_shape: Sequence[int], offsets: Sequence[int], rank: int,
                          dtype=jnp.float32) -> jax.Array:
    """Empty window of past reduced states, (*batch_shape, max(offsets), rank)."""
    return jnp.zeros((*batch_shape, grassmann_window_size(offsets), rank), dtype)


def grassmann_window_from_states(z: jax.Array, offsets: Sequence[int]) -> jax.Array:
    """The window after a prefix: the last max(offsets) rows of z (..., T, r), zero-padded in
    front if T < M."""
    M, T = grassmann_window_size(offsets), z.shape[-2]
    if T >= M:
        return z[..., T - M :, :]
    pad = [(0, 0)] * (z.ndim - 2) + [(M - T, 0), (0, 0)]
    return jnp.pad(z, pad)


def push_grassmann_window(window: jax.Array, z_t: jax.Array) -> jax.Array:
    """Drop the oldest state, append z_t: (..., M, r), (..., r) -> (..., M, r)."""
    return jnp.concatenate([window[..., 1:, :], z_t[..., None, :].astype(window.dtype)], axis=-2)


def grassmann_mix_step(h_t: jax.Array, window: jax.Array, pos: jax.Array,
                       weights: GrassmannWeights | None = None, *, offsets: Sequence[int],
                       eps: float = 1e-6, **weight_arrays) -> tuple[jax.Array, jax.Array]:
    """`grassmann_mix` at the single position `pos`, from the window of earlier reduced states.

    Same maths, same operation order as `grassmann_mix` (wedge collapse), so
    it matches that function's row `pos` to rounding.

    Args:
      h_t: (..., d) hidden state at position pos.
      window: (..., M, r) reduced states z_{pos-M} .. z_{pos-1}, oldest first
        (M = max(offsets); rows before position 0 are ignored).
      pos: int scalar (may be traced), the position of h_t.
      weights (or its arrays as keywords), offsets, eps: as in `grassmann_mix`.

    Returns:
      (out_t (..., d), new window (..., M, r)) -- the window now ends with z_pos.
    """
    weights = GrassmannWeights.of(weights, **weight_arrays)
    offsets = check_offsets(offsets)
    M = max(offsets)
    if window.shape[-2] != M:
        raise ValueError(f"window holds {window.shape[-2]} states, offsets {offsets} need "
                         f"max(offsets) = {M}")
    z = h_t @ weights.w_red + weights.b_red  # (..., r)
    # As in grassmann_mix: directions and w in >= float32.
    acc = jnp.promote_types(z.dtype, jnp.float32)
    u, _ = rescale(z.astype(acc))  # (..., r)
    past, _ = rescale(window.astype(acc))  # (..., M, r)
    # z_{pos-δ}: (..., m, r)
    partners = jnp.stack([past[..., M - delta, :] for delta in offsets], axis=-2)
    valid = pos >= jnp.asarray(offsets)  # (m,): the partner t - δ exists
    g, _, _ = grassmann_feature(u, partners, valid, weights, eps=eps, dtype=z.dtype)
    out, _ = gate(h_t, g.astype(h_t.dtype), weights.w_gate, weights.b_gate)
    return out, push_grassmann_window(window, z)
