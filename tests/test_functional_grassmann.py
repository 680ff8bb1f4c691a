"""grassjax.functional Grassmann mixing: worked examples, fast == reference, gradients, causality."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from grassjax import functional as F


def test_plucker_worked_example_3d():
    p = F.plucker(jnp.array([3.0, 1.0, 2.0]), jnp.array([1.0, 2.0, -1.0]))
    np.testing.assert_allclose(p, [5.0, -5.0, -5.0])


def test_plucker_2d_is_the_determinant():
    np.testing.assert_allclose(F.plucker(jnp.array([3.0, 1.0]), jnp.array([1.0, 2.0])), [5.0])


def test_same_dot_product_different_planes():
    a = (jnp.array([1.0, 2.0, 0.0]), jnp.array([2.0, 1.0, 0.0]))
    b = (jnp.array([1.0, 0.0, 2.0]), jnp.array([2.0, 0.0, 1.0]))
    assert float(a[0] @ a[1]) == float(b[0] @ b[1]) == 4.0
    np.testing.assert_allclose(F.plucker(*a), [-3.0, 0.0, 0.0])
    np.testing.assert_allclose(F.plucker(*b), [0.0, -3.0, 0.0])


def test_plucker_order_and_shape_against_explicit_pairs():
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 3, 6))
    expected = np.stack([u[..., i] * v[..., j] - u[..., j] * v[..., i]
                         for i, j in itertools.combinations(range(6), 2)], -1)
    got = F.plucker(jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32))
    assert got.shape == (2, 3, F.num_plucker_coords(6)) == (2, 3, 15)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_plucker_norm_lagrange_identity():
    rng = np.random.default_rng(1)
    u, v = (jnp.asarray(rng.normal(size=(4, 32)), jnp.float32) for _ in range(2))
    np.testing.assert_allclose(F.plucker_norm(u, v), jnp.linalg.norm(F.plucker(u, v), axis=-1), rtol=1e-4)
    # Parallel vectors span no plane: the norm is computed as |u| |v| sin θ from a Gram-Schmidt residual,
    # so it keeps its digits (within ~r eps_mach |u| |v|, not the identity's sqrt(eps_mach)).
    scale = jnp.linalg.norm(u, axis=-1) * jnp.linalg.norm(3 * u, axis=-1)
    assert bool(jnp.all(F.plucker_norm(u, 3 * u) < 4 * 32 * np.finfo(np.float32).eps * scale))


def random_weights(key, d, r, dtype=jnp.float32, scale=1.0):
    ks = jax.random.split(key, 6)
    n = lambda k, s: scale * jax.random.normal(k, s, dtype)
    return dict(w_red=n(ks[0], (d, r)), b_red=n(ks[1], (r,)),
                w_plu=n(ks[2], (F.num_plucker_coords(r), d)) / np.sqrt(r), b_plu=n(ks[3], (d,)),
                w_gate=n(ks[4], (2 * d, d)) / np.sqrt(d), b_gate=n(ks[5], (d,)))


def relative_error(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("case", range(8))
def test_fast_equals_reference_random_shapes(case):
    rng = np.random.default_rng(case)
    r = int(rng.integers(2, 12))
    d = int(rng.integers(2, 24))
    offsets = tuple(sorted(int(o) for o in rng.choice(np.arange(1, 17), size=rng.integers(1, 6))))
    # T both shorter and longer than the largest offset.
    T = int(rng.integers(1, max(offsets) + 1)) if case % 2 else int(rng.integers(max(offsets) + 1, 40))
    lead = tuple(int(s) for s in rng.integers(1, 4, size=rng.integers(0, 3)))
    h = jax.random.normal(jax.random.key(case), lead + (T, d))
    weights = random_weights(jax.random.key(100 + case), d, r)
    fast, fast_i = F.grassmann_mix(h, offsets=offsets, return_intermediates=True, **weights)
    ref, ref_i = F.grassmann_mix_reference(h, offsets=offsets, return_intermediates=True, **weights)
    assert fast.shape == h.shape
    assert relative_error(fast, ref) < 1e-5, (r, d, T, offsets, lead)
    assert relative_error(fast_i["g"], ref_i["g"]) < 1e-5 or float(jnp.abs(ref_i["g"]).max()) == 0.0
    np.testing.assert_allclose(fast_i["plucker_norm"], ref_i["plucker_norm"], rtol=1e-3, atol=1e-4)


def test_repeated_offsets_count_in_the_mean():
    h = jax.random.normal(jax.random.key(0), (20, 8))
    w = random_weights(jax.random.key(1), 8, 4)
    a = F.grassmann_mix(h, offsets=(1, 2, 4, 8, 8, 8), **w)
    np.testing.assert_allclose(a, F.grassmann_mix_reference(h, offsets=(1, 2, 4, 8, 8, 8), **w), rtol=1e-5, atol=1e-5)
    assert not np.allclose(a, F.grassmann_mix(h, offsets=(1, 2, 4, 8), **w))


def test_hand_worked_single_offset_layer():
    # d = r = 2, identity reduce, no biases: z_t = h_t. With offset 1:
    # p_1 = z_1 ∧ z_0 = 3*2 - 1*1 = 5 (a single coordinate), normalised to 1.
    # W_plu = [[1, -1]] maps it to g_1 = (1, -1); g_0 = 0 (no valid offset).
    # Zero gate weights -> alpha = sigmoid(0) = 1/2, out = (h + g) / 2.
    h = jnp.array([[1.0, 1.0], [3.0, 2.0]])
    weights = dict(w_red=jnp.eye(2), b_red=jnp.zeros(2), w_plu=jnp.array([[1.0, -1.0]]), b_plu=jnp.zeros(2),
                   w_gate=jnp.zeros((4, 2)), b_gate=jnp.zeros(2))
    for fn in (F.grassmann_mix, F.grassmann_mix_reference):
        out, inter = fn(h, offsets=(1,), return_intermediates=True, **weights)
        np.testing.assert_allclose(inter["g"], [[0.0, 0.0], [1.0, -1.0]], atol=1e-6)
        np.testing.assert_allclose(inter["plucker_norm"][:, 0], [0.0, 1.0], atol=1e-6)  # |3*1 - 2*1| = 1
        np.testing.assert_allclose(out, [[0.5, 0.5], [2.0, 0.5]], atol=1e-6)


def test_first_position_has_zero_g_and_validity_mask():
    h = jax.random.normal(jax.random.key(0), (2, 10, 6))
    w = random_weights(jax.random.key(1), 6, 3)
    _, inter = F.grassmann_mix(h, offsets=(2, 4), return_intermediates=True, **w)
    np.testing.assert_array_equal(inter["g"][:, :2], 0.0)
    assert np.all(np.abs(np.asarray(inter["g"][:, 2:])) > 0)
    np.testing.assert_array_equal(inter["valid"], np.arange(10)[:, None] >= np.array([2, 4]))


@pytest.mark.parametrize("fn", [F.grassmann_mix, F.grassmann_mix_reference])
def test_grassmann_is_causal(fn):
    h = jax.random.normal(jax.random.key(0), (2, 24, 8))
    w = random_weights(jax.random.key(1), 8, 4)
    out = fn(h, offsets=(1, 3, 8), **w)
    out2 = fn(h.at[:, 15:].set(3.0), offsets=(1, 3, 8), **w)
    np.testing.assert_array_equal(out[:, :15], out2[:, :15])
    assert not np.allclose(out[:, 15:], out2[:, 15:])


@pytest.mark.parametrize("fn", [F.grassmann_mix, F.grassmann_mix_reference])
def test_grassmann_gradients_float64(fn):
    with jax.enable_x64(True):
        h = jax.random.normal(jax.random.key(0), (6, 4), jnp.float64)
        w = random_weights(jax.random.key(1), 4, 3, dtype=jnp.float64)
        check_grads(lambda h, w_red, w_plu: fn(h, offsets=(1, 2), **{**w, "w_red": w_red, "w_plu": w_plu}),
                    (h, w["w_red"], w["w_plu"]), order=1, modes=("rev",), atol=1e-4, rtol=1e-4)
        u, v = jax.random.normal(jax.random.key(2), (2, 5), jnp.float64)
        check_grads(F.plucker, (u, v), order=2)
        check_grads(F.plucker_norm, (u, v), order=1)


def test_grassmann_jit_vmap_and_bfloat16():
    h = jax.random.normal(jax.random.key(0), (3, 16, 8))
    w = random_weights(jax.random.key(1), 8, 4)
    f = jax.jit(lambda h: F.grassmann_mix(h, offsets=(1, 2, 4), **w))
    np.testing.assert_allclose(f(h), jax.vmap(f)(h[:, None])[:, 0], rtol=1e-5, atol=1e-6)
    w16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), w)
    out16 = F.grassmann_mix(h.astype(jnp.bfloat16), offsets=(1, 2, 4), **w16)
    assert out16.dtype == jnp.bfloat16
    assert relative_error(out16.astype(jnp.float32), f(h)) < 5e-2
    g = jax.grad(lambda h: F.grassmann_mix(h, offsets=(1, 2, 4), **w).sum())(h)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_bad_offsets_are_rejected():
    w = random_weights(jax.random.key(1), 4, 3)
    with pytest.raises(ValueError, match="positive"):
        F.grassmann_mix(jnp.ones((5, 4)), offsets=(0, 1), **w)
