"""Two local control mixers, as pure JAX functions: sliding-window causal attention and a causal
depthwise convolution, and their one-position streaming steps (`*_step`).

They answer "is it the Grassmann maths, or just locality?": both read exactly the positions
t - M .. t that a Grassmann layer with largest offset M reads, with content-based weights
(attention, window W = M) or fixed per-channel ones (convolution, kernel K = M + 1). Streaming
state, like `grassmann_mix_step`'s window, is a fixed-size buffer, oldest row first.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from grassjax.functional.attention import scaled_dot_product_attention


def _check_window(window: int) -> int:
    window = int(window)
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    return window


def sliding_window_mask(T: int, S: int | None = None, *, window: int) -> jax.Array:
    """Boolean (T, S), True where query t may see key s: t - window <= s <= t (keys aligned to
    the end)."""
    window = _check_window(window)
    S = T if S is None else S
    t = jnp.arange(T)[:, None] + (S - T)  # query positions on the key axis
    s = jnp.arange(S)[None, :]
    return (s <= t) & (t - s <= window)


# Jitted with the static arguments static, as grassmann_mix is: eagerly, the mask construction
# and the convolution's K shifted copies would dispatch op by op. Inside an outer jit this is a
# no-op.
@functools.partial(jax.jit, static_argnames=("window", "scale", "return_weights", "implementation"))
def sliding_window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    scale: float | None = None,
    return_weights: bool = False,
    implementation: str | None = None,
):
    """Causal attention restricted to the last `window` keys before each query, plus its own.

    Args:
      q: (..., T, H, D) queries; k, v: (..., S, H, D) keys and values (S >= T, aligned to the end).
      window: W >= 0; query t attends to keys t - W .. t.
      scale, return_weights, implementation: as in `scaled_dot_product_attention`.
    Returns:
      out (..., T, H, D), or (out, weights (..., H, T, S)) when return_weights is True.
    """
    T, S = q.shape[-3], k.shape[-3]
    return scaled_dot_product_attention(q, k, v, causal=True,
                                        mask=sliding_window_mask(T, S, window=window),
                                        scale=scale, return_weights=return_weights,
                                        implementation=implementation)


def _last_rows(x: jax.Array, n: int, axis: int) -> jax.Array:
    """The last n entries of x along `axis`, zero-padded in front when there are fewer."""
    axis = axis % x.ndim
    T = x.shape[axis]
    if T >= n:
        return jax.lax.slice_in_dim(x, T - n, T, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (n - T, 0)
    return jnp.pad(x, pad)


def _push(buffer: jax.Array, row: jax.Array, axis: int) -> jax.Array:
    """Drop the oldest entry of `buffer` along `axis`, append `row` (buffer without that axis)."""
    row = jnp.expand_dims(row.astype(buffer.dtype), axis)
    if buffer.shape[axis] == 0:
        return buffer
    rest = jax.lax.slice_in_dim(buffer, 1, buffer.shape[axis], axis=axis % buffer.ndim)
    return jnp.concatenate([rest, row], axis=axis)


def init_kv_window(batch_shape: Sequence[int], window: int, num_heads: int, head_dim: int,
                   dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Empty key and value buffers, each (*batch_shape, window + 1, H, D)."""
    shape = (*batch_shape, _check_window(window) + 1, num_heads, head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def kv_window_from_states(k: jax.Array, v: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
    """Buffers after a prefix: the last window + 1 rows of k, v (..., T, H, D), zero-padded in
    front."""
    n = _check_window(window) + 1
    return _last_rows(k, n, axis=-3), _last_rows(v, n, axis=-3)


def sliding_window_attention_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array,
                                  k_window: jax.Array, v_window: jax.Array, pos: jax.Array, *,
                                  scale: float | None = None):
    """`sliding_window_attention` at the single position `pos`, from buffers of the previous
    keys and values.

    Args:
      q_t, k_t, v_t: (..., H, D) this position's query, key and value.
      k_window, v_window: (..., W + 1, H, D), positions pos - W - 1 .. pos - 1, oldest first
        (rows for positions before 0 are ignored).
      pos: int scalar (may be traced).
    Returns:
      (out_t (..., H, D), new k_window, new v_window) -- the buffers now end with position pos.
    """
    n = k_window.shape[-3]  # W + 1
    k_window, v_window = _push(k_window, k_t, axis=-3), _push(v_window, v_t, axis=-3)
    # Row j now holds position pos - (n - 1) + j: visible when that position exists.
    visible = (jnp.arange(n) >= (n - 1) - pos)[None, :]  # (1, W + 1)
    out = scaled_dot_product_attention(q_t[..., None, :, :], k_window, v_window, causal=False,
                                       mask=visible, scale=scale)  # (..., 1, H, D)
    return out[..., 0, :, :], k_window, v_window


@jax.jit
def causal_depthwise_conv(x: jax.Array, *, kernel: jax.Array,
                          bias: jax.Array | None = None) -> jax.Array:
    """Per-channel causal convolution: out_t = sum_j kernel[j] * x_{t-j} + bias, j = 0 .. K-1.

    Positions before 0 count as zeros.

    Args:
      x: (..., T, C).
      kernel: (K, C); kernel[j] weights the input j positions back (kernel[0] the current one).
      bias: optional (C,).
    Returns:
      (..., T, C), the dtype of x.
    """
    K, T = kernel.shape[0], x.shape[-2]
    kernel = kernel.astype(x.dtype)
    out = x * kernel[0]
    # K shifted copies, summed: XLA fuses them into one loop, and K (= max offset + 1) is small.
    for j in range(1, min(K, T)):
        # x_{t-j}, 0 for t < j
        shifted = jnp.pad(x[..., : T - j, :], [(0, 0)] * (x.ndim - 2) + [(j, 0), (0, 0)])
        out = out + shifted * kernel[j]
    return out if bias is None else out + bias.astype(x.dtype)


def init_conv_window(batch_shape: Sequence[int], kernel_size: int, channels: int,
                     dtype=jnp.float32) -> jax.Array:
    """Empty buffer of past inputs, (*batch_shape, kernel_size - 1, C)."""
    return jnp.zeros((*batch_shape, kernel_size - 1, channels), dtype)


def conv_window_from_states(x: jax.Array, kernel_size: int) -> jax.Array:
    """Buffer after a prefix x (..., T, C): its last kernel_size - 1 rows, zero-padded in front."""
    return _last_rows(x, kernel_size - 1, axis=-2)


def causal_conv_step(x_t: jax.Array, window: jax.Array, *, kernel: jax.Array,
                     bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`causal_depthwise_conv` at one position, from the buffer of earlier inputs.

    Args:
      x_t: (..., C) input at position pos.
      window: (..., K - 1, C) inputs x_{pos-K+1} .. x_{pos-1}, oldest first (zeros before
        position 0, which is exactly the convolution's zero padding, so no position mask is
        needed).
      kernel, bias: as in `causal_depthwise_conv`.
    Returns:
      (out_t (..., C), new window ending with x_t).
    """
    K = kernel.shape[0]
    if window.shape[-2] != K - 1:
        raise ValueError(f"window holds {window.shape[-2]} inputs, a kernel of size {K} needs "
                         f"{K - 1}")
    kernel = kernel.astype(x_t.dtype)
    # window row K-1-j holds x_{pos-j} for j = 1 .. K-1: reverse the kernel's tail to line them up.
    out = x_t * kernel[0] + jnp.einsum("...kc,kc->...c", window.astype(x_t.dtype), kernel[1:][::-1])
    if bias is not None:
        out = out + bias.astype(x_t.dtype)
    return out, _push(window, x_t, axis=-2)
