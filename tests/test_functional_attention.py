"""grassjax.functional attention: hand-worked values, an explicit reference, gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from grassjax import functional as F


def _qkv(key, shape=(2, 7, 3, 4), dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    return tuple(jax.random.normal(k, shape, dtype) for k in (kq, kk, kv))


def test_causal_average_equals_explicit_loop():
    x = np.random.default_rng(0).normal(size=(3, 9, 5)).astype(np.float32)
    expected = np.stack([x[:, : t + 1].mean(axis=1) for t in range(9)], axis=1)
    np.testing.assert_allclose(F.causal_average(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)


def test_causal_average_hand_worked():
    x = jnp.array([[2.0], [4.0], [9.0]])
    np.testing.assert_allclose(F.causal_average(x), [[2.0], [3.0], [5.0]])


def test_attention_rows_sum_to_one_and_are_zero_above_diagonal():
    q, k, v = _qkv(jax.random.key(0))
    _, w = F.scaled_dot_product_attention(q, k, v, return_weights=True)
    assert w.shape == (2, 3, 7, 7)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    upper = np.triu(np.ones((7, 7), bool), k=1)
    assert np.all(np.asarray(w)[..., upper] == 0.0)


def test_attention_hand_worked_two_tokens():
    # One head, D=1: q1 = 1, k = (0, ln 3)*sqrt(1) -> weights at t=1 are (1/4, 3/4).
    q = jnp.array([[[1.0]], [[1.0]]])  # (T=2, H=1, D=1)
    k = jnp.array([[[0.0]], [[math.log(3.0)]]])
    v = jnp.array([[[4.0]], [[8.0]]])
    out, w = F.scaled_dot_product_attention(q, k, v, return_weights=True)
    np.testing.assert_allclose(w[0], [[1.0, 0.0], [0.25, 0.75]], rtol=1e-6)
    np.testing.assert_allclose(out[:, 0, 0], [4.0, 7.0], rtol=1e-6)


def _reference_attention(q, k, v):
    T, D = q.shape[-3], q.shape[-1]
    out = np.zeros(q.shape, np.float64)
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    for idx in np.ndindex(q.shape[:-3]):
        for h in range(q.shape[-2]):
            for t in range(T):
                logits = np.array([q[idx][t, h] @ k[idx][s, h] / math.sqrt(D) for s in range(t + 1)])
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[idx][t, h] = sum(p[s] * v[idx][s, h] for s in range(t + 1))
    return out


@pytest.mark.parametrize("return_weights", [False, True])
def test_attention_matches_explicit_loops_with_extra_batch_dims(return_weights):
    q, k, v = _qkv(jax.random.key(1), shape=(2, 3, 6, 2, 4))  # two leading batch dims
    got = F.scaled_dot_product_attention(q, k, v, return_weights=return_weights)
    got = got[0] if return_weights else got
    np.testing.assert_allclose(got, _reference_attention(q, k, v), rtol=1e-4, atol=1e-5)


def test_fused_and_explicit_paths_agree_with_custom_mask():
    q, k, v = _qkv(jax.random.key(2))
    mask = jnp.asarray(np.random.default_rng(0).random((7, 7)) > 0.3) | jnp.eye(7, dtype=bool)
    fused = F.scaled_dot_product_attention(q, k, v, mask=mask)
    explicit, _ = F.scaled_dot_product_attention(q, k, v, mask=mask, return_weights=True)
    np.testing.assert_allclose(fused, explicit, rtol=1e-5, atol=1e-6)


def test_attention_is_causal():
    q, k, v = _qkv(jax.random.key(3))
    out = F.scaled_dot_product_attention(q, k, v)
    k2, v2 = k.at[:, 4:].set(5.0), v.at[:, 4:].set(-5.0)
    q2 = q.at[:, 4:].set(7.0)
    out2 = F.scaled_dot_product_attention(q2, k2, v2)
    np.testing.assert_array_equal(out[:, :4], out2[:, :4])
    assert not np.allclose(out[:, 4:], out2[:, 4:])


def test_attention_under_jit_vmap_and_bfloat16():
    q, k, v = _qkv(jax.random.key(4), shape=(5, 6, 2, 4))
    f = jax.jit(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    per_example = jax.vmap(lambda q, k, v: F.scaled_dot_product_attention(q[None], k[None], v[None])[0])
    np.testing.assert_allclose(f(q, k, v), per_example(q, k, v), rtol=1e-5, atol=1e-6)
    out_bf16 = f(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
    assert out_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(out_bf16.astype(jnp.float32), f(q, k, v), atol=5e-2)


def test_attention_gradients_float64():
    with jax.enable_x64(True):
        q, k, v = _qkv(jax.random.key(5), shape=(1, 4, 2, 3), dtype=jnp.float64)
        check_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, return_weights=True)[0],
                    (q, k, v), order=2, modes=("rev",))
        check_grads(F.causal_average, (q[0, :, 0],), order=2, modes=("fwd", "rev"))
