"""The local control mixers: sliding-window attention and causal depthwise convolution.

Each gets the mixer checks: an explicit reference, a hand-worked example, causality, and the streaming
step equal to the full computation at every position.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grassjax import functional as F


def _reference_window_attention(q, k, v, window):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    T, H, D = q.shape[-3:]
    out = np.zeros(q.shape)
    for idx in np.ndindex(q.shape[:-3]):
        for h in range(H):
            for t in range(T):
                keys = range(max(0, t - window), t + 1)  # t - W .. t
                logits = np.array([q[idx][t, h] @ k[idx][s, h] / math.sqrt(D) for s in keys])
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[idx][t, h] = sum(pi * v[idx][s, h] for pi, s in zip(p, keys))
    return out


@pytest.mark.parametrize("window, return_weights", [(0, False), (3, True), (50, False)])
def test_sliding_window_attention_matches_explicit_loops(window, return_weights):
    q, k, v = jax.random.normal(jax.random.key(window), (3, 2, 9, 2, 4))
    got = F.sliding_window_attention(q, k, v, window=window, return_weights=return_weights)
    got = got[0] if return_weights else got
    np.testing.assert_allclose(got, _reference_window_attention(q, k, v, window), rtol=1e-4, atol=1e-5)


def test_sliding_window_large_window_is_causal_attention_and_zero_window_is_identity():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 7, 2, 4))
    np.testing.assert_allclose(F.sliding_window_attention(q, k, v, window=6), F.scaled_dot_product_attention(q, k, v),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(F.sliding_window_attention(q, k, v, window=0), v, rtol=1e-6)


def test_sliding_window_hand_worked():
    # T = 3, window 1, one head, D = 1, q = 1: position 2 sees keys 1, 2 only (not 0).
    # k = (100, 0, ln 3): weights at t=2 are (0, 1/4, 3/4) -> out = (2 + 3*6)/4 = 5; at t=1 (e^100, 1)/.. -> v_0.
    q = jnp.ones((3, 1, 1))
    k = jnp.array([100.0, 0.0, math.log(3.0)]).reshape(3, 1, 1)
    v = jnp.array([-7.0, 2.0, 6.0]).reshape(3, 1, 1)
    out, w = F.sliding_window_attention(q, k, v, window=1, return_weights=True)
    np.testing.assert_allclose(w[0, 2], [0.0, 0.25, 0.75], rtol=1e-6)
    np.testing.assert_allclose(out[:, 0, 0], [-7.0, -7.0, 5.0], rtol=1e-5)
    np.testing.assert_array_equal(F.sliding_window_mask(3, window=1),
                                  [[True, False, False], [True, True, False], [False, True, True]])


def test_sliding_window_is_causal():
    q, k, v = jax.random.normal(jax.random.key(3), (3, 2, 12, 2, 4))
    out = F.sliding_window_attention(q, k, v, window=3)
    out2 = F.sliding_window_attention(q.at[:, 6:].set(2.0), k.at[:, 6:].set(5.0), v.at[:, 6:].set(-5.0), window=3)
    np.testing.assert_array_equal(out[:, :6], out2[:, :6])
    assert not np.allclose(out[:, 6:], out2[:, 6:])


@pytest.mark.parametrize("window", [0, 3, 30])
def test_sliding_window_step_equals_full_at_every_position(window):
    B, T, H, D = 2, 11, 2, 4
    q, k, v = jax.random.normal(jax.random.key(1), (3, B, T, H, D))
    full = F.sliding_window_attention(q, k, v, window=window)

    @jax.jit
    def stream():
        def step(carry, t):
            kw, vw = carry
            out, kw, vw = F.sliding_window_attention_step(q[:, t], k[:, t], v[:, t], kw, vw, t)
            return (kw, vw), out

        (kw, vw), outs = jax.lax.scan(step, F.init_kv_window((B,), window, H, D), jnp.arange(T))
        return jnp.swapaxes(outs, 0, 1), kw

    outs, kw = stream()
    np.testing.assert_allclose(outs, full, rtol=1e-5, atol=1e-6)
    assert kw.shape == (B, window + 1, H, D)
    np.testing.assert_array_equal(kw, F.kv_window_from_states(k, v, window)[0])


def _reference_conv(x, kernel, bias):
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    out = np.zeros(x.shape)
    for t in range(x.shape[-2]):
        for j in range(kernel.shape[0]):
            if t - j >= 0:
                out[..., t, :] += kernel[j] * x[..., t - j, :]
    return out + np.asarray(bias)


@pytest.mark.parametrize("K, T", [(1, 5), (3, 9), (17, 6)])  # kernel shorter and longer than the sequence
def test_causal_conv_matches_explicit_loops(K, T):
    x = jax.random.normal(jax.random.key(0), (2, 3, T, 5))
    kernel, bias = jax.random.normal(jax.random.key(1), (K, 5)), jax.random.normal(jax.random.key(2), (5,))
    np.testing.assert_allclose(F.causal_depthwise_conv(x, kernel=kernel, bias=bias), _reference_conv(x, kernel, bias),
                               rtol=1e-5, atol=1e-5)


def test_causal_conv_hand_worked():
    # One channel, kernel (1, 10, 100): out_t = x_t + 10 x_{t-1} + 100 x_{t-2}.
    x = jnp.array([[1.0], [2.0], [3.0], [4.0]])
    out = F.causal_depthwise_conv(x, kernel=jnp.array([[1.0], [10.0], [100.0]]), bias=jnp.array([0.5]))
    np.testing.assert_allclose(out[:, 0], [1.5, 12.5, 123.5, 234.5])


def test_causal_conv_is_causal():
    x = jax.random.normal(jax.random.key(0), (2, 12, 4))
    kernel = jax.random.normal(jax.random.key(1), (4, 4))
    out = F.causal_depthwise_conv(x, kernel=kernel)
    out2 = F.causal_depthwise_conv(x.at[:, 7:].set(3.0), kernel=kernel)
    np.testing.assert_array_equal(out[:, :7], out2[:, :7])
    assert not np.allclose(out[:, 7:], out2[:, 7:])


@pytest.mark.parametrize("K", [2, 5])
def test_causal_conv_step_equals_full_at_every_position(K):
    B, T, C = 2, 9, 3
    x = jax.random.normal(jax.random.key(0), (B, T, C))
    kernel, bias = jax.random.normal(jax.random.key(1), (K, C)), jax.random.normal(jax.random.key(2), (C,))
    full = F.causal_depthwise_conv(x, kernel=kernel, bias=bias)

    def step(window, t):
        out, window = F.causal_conv_step(x[:, t], window, kernel=kernel, bias=bias)
        return window, out

    window, outs = jax.lax.scan(step, F.init_conv_window((B,), K, C), jnp.arange(T))
    np.testing.assert_allclose(jnp.swapaxes(outs, 0, 1), full, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(window, F.conv_window_from_states(x, K))
    with pytest.raises(ValueError, match="kernel of size"):
        F.causal_conv_step(x[:, 0], window[:, 1:], kernel=kernel)
