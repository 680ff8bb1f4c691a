"""Hand-checked attention and Grassmann statistics."""

import jax
import jax.numpy as jnp
import numpy as np

from grassjax import functional as F
from grassjax.functional import stats


def uniform_causal(T, B=1, H=2):
    w = np.tril(np.ones((T, T)))
    w /= w.sum(-1, keepdims=True)
    return jnp.asarray(np.broadcast_to(w, (B, H, T, T)), jnp.float32)


def test_uniform_causal_attention_has_normalised_entropy_one():
    s = stats.attention_stats(uniform_causal(9))
    np.testing.assert_allclose(s["entropy"], [1.0, 1.0], rtol=1e-6)
    # E|i-j| under uniform weights over 0..t is t/2; mean over rows t = 0..8 is 2.
    np.testing.assert_allclose(s["distance"], [2.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(s["self_weight"], np.mean(1 / np.arange(1, 10)), rtol=1e-6)


def test_one_hot_on_current_token():
    w = jnp.broadcast_to(jnp.eye(6), (2, 3, 6, 6))
    s = stats.attention_stats(w, max_logit=jnp.array([[1.0, 5.0, 2.0], [3.0, 0.0, 2.5]]))
    np.testing.assert_allclose(s["entropy"], 0.0, atol=1e-7)
    np.testing.assert_allclose(s["distance"], 0.0)
    np.testing.assert_allclose(s["self_weight"], 1.0)
    np.testing.assert_allclose(s["max_logit"], [3.0, 5.0, 2.5])


def test_attention_on_first_token_has_full_distance():
    T = 5
    w = jnp.zeros((1, 1, T, T)).at[..., 0].set(1.0)
    s = stats.attention_stats(w)
    np.testing.assert_allclose(s["distance"], [np.mean(np.arange(T))])
    np.testing.assert_allclose(s["entropy"], [0.0], atol=1e-7)


def test_gate_statistics_match_hand_computation():
    # d = r = 2, identity reduction, offset 1 (the worked example of test_functional_grassmann).
    # Gate weights zero and bias b -> alpha = sigmoid(b) everywhere.
    h = jnp.array([[1.0, 1.0], [3.0, 2.0], [0.0, 1.0]])
    b_gate = jnp.array([0.0, np.log(3.0)])  # alphas 1/2 and 3/4
    weights = dict(w_red=jnp.eye(2), b_red=jnp.zeros(2), w_plu=jnp.array([[1.0, -1.0]]), b_plu=jnp.zeros(2),
                   w_gate=jnp.zeros((4, 2)), b_gate=b_gate)
    _, inter = F.grassmann_mix(h, offsets=(1,), return_intermediates=True, **weights)
    s = stats.grassmann_stats(inter, offsets=(1,), hist_bins=4)
    np.testing.assert_allclose(s["gate_mean"], 0.625, rtol=1e-6)
    np.testing.assert_allclose(s["gate_std"], 0.125, rtol=1e-5)
    np.testing.assert_array_equal(s["gate_hist"], [0, 0, 3, 3])  # 0.5 falls in [0.5, 0.75), 0.75 in [0.75, 1]
    np.testing.assert_allclose(s["zero_g_fraction"], 1 / 3, rtol=1e-6)
    # ‖z‖ = sqrt(2), sqrt(13), 1 ; Plücker norms |3*1-2*1| = 1 and |0*2-1*3| = 3 over the valid pairs.
    np.testing.assert_allclose(s["z_norm_mean"], np.mean([np.sqrt(2), np.sqrt(13), 1.0]), rtol=1e-6)
    np.testing.assert_allclose(s["plucker_norm_mean"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(s["plucker_norm_std"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(s["offset_share"], [1.0], rtol=1e-6)  # a single offset carries everything


def test_offset_share_favours_the_aligned_offset():
    # Offsets 1 and 2. Construct z so that at t=2 the plane with t-1 equals the mean plane direction
    # more than the plane with t-2 does; shares are non-negative and sum to one on valid rows.
    key = jax.random.key(0)
    h = jax.random.normal(key, (4, 12, 6))
    w = {k: jax.random.normal(jax.random.fold_in(key, i), s) for i, (k, s) in enumerate(
        [("w_red", (6, 3)), ("b_red", (3,)), ("w_plu", (3, 6)), ("b_plu", (6,)), ("w_gate", (12, 6)), ("b_gate", (6,))])}
    _, inter = F.grassmann_mix(h, offsets=(1, 2), return_intermediates=True, **w)
    share = stats.offset_alignment(inter["z"], inter["w"], inter["valid"], (1, 2))
    assert share.shape == (4, 12, 2)
    np.testing.assert_allclose(share[:, 0], 0.0)  # t = 0: no valid offset
    np.testing.assert_allclose(share[:, 1], [[1.0, 0.0]] * 4, atol=1e-6)  # t = 1: only offset 1
    np.testing.assert_allclose(share[:, 2:].sum(-1), 1.0, rtol=1e-5)
    assert bool(jnp.all(share >= 0))
    # With identical partners the two offsets share equally.
    z = jnp.tile(jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (3, 1))[:5]  # e0 e1 e0 e1 e0
    z = z.at[2].set(jnp.array([0.0, 1.0, 0.0])).at[1].set(jnp.array([0.0, 1.0, 0.0]))  # t=3 sees e1 at t-1, t-2
    z = z.at[3].set(jnp.array([1.0, 0.0, 0.0]))
    valid = jnp.asarray(F.offset_validity((1, 2), 5))
    wbar = (jnp.roll(z, 1, 0) + jnp.roll(z, 2, 0)) / 2
    s = stats.offset_alignment(z, wbar, valid, (1, 2))
    np.testing.assert_allclose(s[3], [0.5, 0.5], rtol=1e-6)
