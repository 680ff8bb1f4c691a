"""Causal Grassmann mixing (arXiv 2512.19428) as pure JAX functions.

For hidden states h_t (t = 0..T-1) and a set of offsets W:

  z_t   = h_t W_red + b_red                          reduce d -> r
  p_t^δ = z_t ∧ z_{t-δ}                              Plücker coordinates, r(r-1)/2 of them
  p̂_t^δ = p_t^δ / max(‖p_t^δ‖, eps)
  g_t   = mean over valid δ of (p̂_t^δ W_plu + b_plu)  valid: t - δ >= 0
  α_t   = sigmoid([h_t; g_t] W_gate + b_gate)
  out_t = α_t * h_t + (1 - α_t) * g_t

Two choices the paper leaves open, made as every public reproduction does:
  * causality is backward: position t pairs with t - δ, never t + δ;
  * a position with no valid offset (t < min W) gets g_t = 0.

`grassmann_mix_reference` computes this literally. `grassmann_mix` uses the
wedge-collapse identity: z_t is common to every pair and the wedge is
bilinear, so

  mean_δ p̂_t^δ = z_t ∧ w_t,   w_t = mean_δ z_{t-δ} / max(‖z_t ∧ z_{t-δ}‖, eps)

and one projection replaces |W| of them. The norms come from the Lagrange
identity ‖u ∧ v‖² = ‖u‖²‖v‖² - (u·v)², O(r) instead of O(r²).

Order-keeping variant (`partner_mix`, one r x r matrix M_δ per offset): the mean over offsets forgets
which partner came from which offset -- z_t ∧ (ẑ_{t-1} + ẑ_{t-2}) cannot tell "a then b" from "b then a"
once they are summed. Mixing each normalised partner by its own matrix before the sum,

  w_t = mean_δ ẑ_{t-δ} M_δ,   ẑ_{t-δ} = z_{t-δ} / max(‖z_t ∧ z_{t-δ}‖, eps)   (row vectors, x @ M)

keeps the collapse exact, because the wedge is linear in its second argument:
mean_δ z_t ∧ (ẑ_{t-δ} M_δ) = z_t ∧ w_t, so it is still one projection. Each offset now writes into its
own part of the Plücker space; with every M_δ = I it is the paper's layer. Cost: m r² extra
parameters and an (m, r) x (r, r) product per position, small next to the r² d projection.

Weight layout (x @ W convention, like Flax's Linear kernels):
  w_red (d, r), b_red (r,), w_plu (r(r-1)/2, d), b_plu (d,),
  w_gate (2d, d) acting on [h; g], b_gate (d,).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


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
    rows = [u[..., i : i + 1] * v[..., i + 1 :] - v[..., i : i + 1] * u[..., i + 1 :] for i in range(r - 1)]
    if not rows:
        return jnp.zeros(u.shape[:-1] + (0,), u.dtype)
    return jnp.concatenate(rows, axis=-1)


@functools.lru_cache(maxsize=None)
def _antisymmetric_tables(r: int) -> tuple[np.ndarray, np.ndarray]:
    """For the flattened r x r matrix: coordinate index k(i, j) of the pair {i, j}, and sign +1 (i<j), -1 (i>j), 0."""
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


@jax.jit
def plucker_norm(u: jax.Array, v: jax.Array) -> jax.Array:
    """‖u ∧ v‖ through the Lagrange identity, in O(r).

    Args:
      u, v: (..., r).
    Returns:
      (...,). Computed in float32 at least: the identity subtracts two large
      numbers, which bfloat16 cannot do.
    """
    dtype = jnp.promote_types(jnp.result_type(u, v), jnp.float32)
    u, v = u.astype(dtype), v.astype(dtype)
    sq = jnp.sum(u * u, -1) * jnp.sum(v * v, -1) - jnp.sum(u * v, -1) ** 2
    return _safe_sqrt(sq)


def _safe_sqrt(sq: jax.Array) -> jax.Array:
    """sqrt with a zero (not NaN) gradient at 0: the t < δ rows pair with a zero vector."""
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _valid_offsets(offsets: Sequence[int]) -> tuple[int, ...]:
    offsets = tuple(int(o) for o in offsets)
    if not offsets or min(offsets) < 1:
        raise ValueError(f"offsets must be a non-empty set of positive integers, got {offsets}")
    return offsets


def _shift(x: jax.Array, delta: int, axis: int) -> jax.Array:
    """x[t - delta] along `axis`, zero-filled for t < delta (static delta)."""
    T = x.shape[axis]
    if delta >= T:
        return jnp.zeros_like(x)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (delta, 0)
    kept = jax.lax.slice_in_dim(x, 0, T - delta, axis=axis)
    return jnp.pad(kept, pad)


def offset_validity(offsets: Sequence[int], T: int) -> np.ndarray:
    """(T, m) bool: True where position t has a partner t - offsets[k] >= 0."""
    return np.arange(T)[:, None] >= np.asarray(offsets)[None, :]


def _gate(h, g, w_gate, b_gate):
    # sigmoid([h; g] W_gate + b), written as two matmuls to avoid materialising the concat.
    d = h.shape[-1]
    alpha = jax.nn.sigmoid(h @ w_gate[:d] + g @ w_gate[d:] + b_gate)
    return alpha * h + (1 - alpha) * g, alpha


# Both mixing functions are jitted with static offsets: run eagerly, their
# per-offset Python loops would dispatch dozens of tiny ops one by one.
# Inside an outer jit this is a no-op.
_jit_mixer = functools.partial(jax.jit, static_argnames=("offsets", "eps", "return_intermediates"))


def grassmann_mix_reference(
    h: jax.Array,
    *,
    w_red: jax.Array,
    b_red: jax.Array,
    w_plu: jax.Array,
    b_plu: jax.Array,
    w_gate: jax.Array,
    b_gate: jax.Array,
    offsets: Sequence[int],
    eps: float = 1e-6,
    return_intermediates: bool = False,
    partner_mix: jax.Array | None = None,
):
    """Causal Grassmann mixing, computed literally: every offset, explicit coordinates.

    Slow (one r(r-1)/2 x d projection per offset); kept as the specification
    that `grassmann_mix` is tested against.

    Args:
      h: (..., T, d) hidden states.
      w_red, b_red, w_plu, b_plu, w_gate, b_gate: weights, see module docstring.
      offsets: positive ints; position t pairs with t - δ. Repeats count twice
        in the mean, as in the paper's {1, 2, 4, 8, 8, 8}.
      eps: floor on the Plücker norm before normalising.
      return_intermediates: also return a dict of intermediates.
      partner_mix: optional (m, r, r), one matrix per entry of `offsets`: the order-keeping variant,
        g_t^δ = W_plu (z_t ∧ z_{t-δ} M_δ) / max(‖z_t ∧ z_{t-δ}‖, eps) + b_plu (module docstring).

    Returns:
      out (..., T, d), or (out, intermediates) -- see `grassmann_mix`.
    """
    offsets = _valid_offsets(offsets)
    _check_partner_mix(partner_mix, offsets, w_red.shape[-1])
    return _reference(h, w_red=w_red, b_red=b_red, w_plu=w_plu, b_plu=b_plu, w_gate=w_gate, b_gate=b_gate,
                      offsets=offsets, eps=eps, return_intermediates=return_intermediates, partner_mix=partner_mix)


def _check_partner_mix(partner_mix, offsets, r):
    if partner_mix is not None and tuple(partner_mix.shape) != (len(offsets), r, r):
        raise ValueError(f"partner_mix must be (len(offsets), r, r) = {(len(offsets), r, r)}, "
                         f"got {tuple(partner_mix.shape)}")


@_jit_mixer
def _reference(h, *, w_red, b_red, w_plu, b_plu, w_gate, b_gate, offsets, eps, return_intermediates,
               partner_mix=None):
    T = h.shape[-2]
    z = h @ w_red + b_red  # (..., T, r)
    valid = offset_validity(offsets, T)  # (T, m)
    acc = jnp.promote_types(z.dtype, jnp.float32)
    g_sum = jnp.zeros(h.shape, acc)
    norms = []
    for k, delta in enumerate(offsets):
        p = plucker(z, _shift(z, delta, axis=-2)).astype(acc)  # (..., T, P)
        norm = _safe_sqrt(jnp.sum(p * p, axis=-1, keepdims=True))  # (..., T, 1)
        p_hat = p / jnp.maximum(norm, eps)
        if partner_mix is not None:  # order-keeping variant: the plane of z_t and z_{t-δ} M_δ, same normaliser
            mixed = _shift(z, delta, axis=-2).astype(acc) @ partner_mix[k].astype(acc)
            p_hat = plucker(z.astype(acc), mixed) / jnp.maximum(norm, eps)
        g_delta = p_hat @ w_plu.astype(acc) + b_plu  # (..., T, d)
        g_sum = g_sum + jnp.where(valid[:, k : k + 1], g_delta, 0.0)
        norms.append(jnp.where(valid[:, k], norm[..., 0], 0.0))
    num_valid = valid.sum(axis=1)[:, None]  # (T, 1)
    g = (g_sum / np.maximum(num_valid, 1)).astype(h.dtype)  # rows with no valid offset stay 0
    out, alpha = _gate(h, g, w_gate, b_gate)
    if not return_intermediates:
        return out
    return out, dict(z=z, g=g, alpha=alpha, plucker_norm=jnp.stack(norms, -1), valid=jnp.asarray(valid))


def grassmann_mix(
    h: jax.Array,
    *,
    w_red: jax.Array,
    b_red: jax.Array,
    w_plu: jax.Array,
    b_plu: jax.Array,
    w_gate: jax.Array,
    b_gate: jax.Array,
    offsets: Sequence[int],
    eps: float = 1e-6,
    return_intermediates: bool = False,
    partner_mix: jax.Array | None = None,
):
    """Causal Grassmann mixing via the wedge-collapse identity.

    Same maths and arguments as `grassmann_mix_reference`, at
    O(T (m r + r² d)) instead of O(T m r² d) for m offsets.

    Args:
      h: (..., T, d) hidden states, float32 or bfloat16.
      w_red (d, r), b_red (r,), w_plu (r(r-1)/2, d), b_plu (d,),
      w_gate (2d, d), b_gate (d,): weights.
      offsets: positive ints (static). Position t pairs with t - δ.
      eps: floor on each Plücker norm before normalising.
      return_intermediates: also return a dict with
        z (..., T, r)            reduced states,
        g (..., T, d)            aggregated Grassmann features (0 where no offset is valid),
        alpha (..., T, d)        gate values,
        plucker_norm (..., T, m) ‖z_t ∧ z_{t-δ}‖ per offset (0 where invalid),
        valid (T, m)             whether each offset is valid at t,
        w (..., T, r)            the collapsed partner w_t.
      partner_mix: optional (m, r, r): the order-keeping variant, w_t = mean_δ ẑ_{t-δ} M_δ.

    Returns:
      out (..., T, d), or (out, intermediates).
    """
    offsets = _valid_offsets(offsets)
    _check_partner_mix(partner_mix, offsets, w_red.shape[-1])
    return _wedge_collapse(h, w_red=w_red, b_red=b_red, w_plu=w_plu, b_plu=b_plu, w_gate=w_gate, b_gate=b_gate,
                           offsets=offsets, eps=eps, return_intermediates=return_intermediates,
                           partner_mix=partner_mix)


@_jit_mixer
def _wedge_collapse(h, *, w_red, b_red, w_plu, b_plu, w_gate, b_gate, offsets, eps, return_intermediates,
                    partner_mix=None):
    # Everything but the time shifts is per position, so it runs on (N, ...) with N = batch x T rows: the
    # same shapes (and the same XLA fusions, parallelised over N) whether the batch is 16 x 256 or 1 x 4096.
    *lead, T, d = h.shape
    n = math.prod(lead)
    h2 = h.reshape(n * T, d)
    z = h2 @ w_red + b_red  # (N, r)
    r = z.shape[-1]
    acc = jnp.promote_types(z.dtype, jnp.float32)  # norms and w in >= float32: Lagrange cancels large terms
    z32 = z.astype(acc)
    valid_t = offset_validity(offsets, T)  # (T, m), static
    valid = np.tile(valid_t, (n, 1))  # (N, m)
    # All offsets at once (a handful of fused ops instead of a few per offset, forward and backward):
    # partners[row(b, t), k, :] = z_{b, t - δ_k}, zero where t < δ_k.
    zt = z32.reshape(n, T, r)
    partners = jnp.stack([_shift(zt, delta, axis=-2) for delta in offsets], axis=-2).reshape(n * T, len(offsets), r)
    # ‖z_t ∧ z_{t-δ}‖ by the Lagrange identity, as plucker_norm computes it.
    zz, pp = jnp.sum(z32 * z32, -1)[..., None], jnp.sum(partners * partners, -1)
    sq = zz * pp - jnp.sum(z32[..., None, :] * partners, -1) ** 2
    norm = _safe_sqrt(sq)  # (N, m)
    scaled = partners / jnp.maximum(norm, eps)[..., None]  # ẑ_{t-δ}, (N, m, r)
    if partner_mix is not None:  # order-keeping variant: ẑ_{t-δ} M_δ
        scaled = jnp.einsum("nkr,krs->nks", scaled, partner_mix.astype(acc))
    w = jnp.sum(jnp.where(valid[..., None], scaled, 0.0), axis=-2)  # (N, r)
    num_valid = valid.sum(axis=1)[:, None]  # (N, 1)
    w = w / np.maximum(num_valid, 1)
    g = plucker(z, w.astype(z.dtype)) @ w_plu + b_plu  # one projection for all offsets
    g = jnp.where(num_valid > 0, g, 0).astype(h.dtype)
    out, alpha = _gate(h2, g, w_gate, b_gate)
    unflatten = lambda a: a.reshape(tuple(lead) + (T,) + a.shape[1:])
    if not return_intermediates:
        return unflatten(out)
    return unflatten(out), dict(z=unflatten(z), g=unflatten(g), alpha=unflatten(alpha),
                                plucker_norm=unflatten(jnp.where(valid, norm, 0.0)), valid=jnp.asarray(valid_t),
                                w=unflatten(w))
