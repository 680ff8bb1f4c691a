"""Adversarial numerics: every Grassmann path against a float64 oracle, and attention's fully masked rows.

The oracle is written in NumPy from the definition, with explicit Plücker
coordinates p = z_t ∧ z_{t-δ} of the raw states and the relative eps rule
p̂ = p / max(‖p‖, eps ‖z_t‖ ‖z_{t-δ}‖). The float32 paths are held to the
error bound stated in grassjax/functional/grassmann.py: each p̂ within about
r ε_mach / max(sin θ, eps) of the exact one, so g within ‖W_plu‖₂ times that.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grassjax import generation
from grassjax import functional as F
from grassjax.nn import ModelConfig, build_model

EPS = 1e-6  # the default eps of every path
EPS32 = float(np.finfo(np.float32).eps)


def plucker64(u, v):
    """Explicit Plücker coordinates in float64 NumPy, i < j row-major."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    pairs = itertools.combinations(range(u.shape[-1]), 2)
    return np.stack([u[..., i] * v[..., j] - u[..., j] * v[..., i] for i, j in pairs], -1)


def oracle(h, w, offsets, eps=EPS):
    """float64 Grassmann mixing from the definition: returns out, g (..., T, d) and sin θ (..., T, m)."""
    h = np.asarray(h, np.float64)
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    z = h @ w["w_red"] + w["b_red"]
    T = z.shape[-2]
    g = np.zeros(h.shape)
    sin = np.zeros(h.shape[:-1] + (len(offsets),))
    for t in range(T):
        feats = []
        for k, delta in enumerate(offsets):
            if t < delta:
                continue
            u, v = z[..., t, :], z[..., t - delta, :]
            p = plucker64(u, v)
            norm = np.sqrt((p * p).sum(-1, keepdims=True))
            scale = np.linalg.norm(u, axis=-1, keepdims=True) * np.linalg.norm(v, axis=-1, keepdims=True)
            denom = np.maximum(norm, eps * scale)
            p_hat = np.divide(p, denom, out=np.zeros_like(p), where=denom > 0)  # zero states: p = 0
            sin[..., t, k] = np.divide(norm, scale, out=np.zeros_like(norm), where=scale > 0)[..., 0]
            feats.append(p_hat @ w["w_plu"] + w["b_plu"])
        if feats:
            g[..., t, :] = np.mean(feats, axis=0)
    d = h.shape[-1]
    alpha = 0.5 * (1 + np.tanh(0.5 * (h @ w["w_gate"][:d] + g @ w["w_gate"][d:] + w["b_gate"])))  # sigmoid
    return alpha * h + (1 - alpha) * g, g, sin


def g_bound(w, sin, offsets, T, r):
    """Per-position bound on |g32 - g64|: ‖W_plu‖₂ · r ε / max(sin θ, eps) over the valid pairs, plus the
    rounding of the projection itself."""
    valid = F.offset_validity(offsets, T)
    worst = np.where(valid, 1.0 / np.maximum(sin, EPS), 0.0).max(-1, initial=0.0)  # (..., T)
    w_plu = np.asarray(w["w_plu"], np.float64)
    projection = 4 * EPS32 * (np.abs(w_plu).sum(0).max() + np.abs(np.asarray(w["b_plu"])).max())
    return np.linalg.norm(w_plu, 2) * r * EPS32 * worst + projection


def stream(h, w, offsets):
    """grassmann_mix_step over every position, one at a time (the decode path)."""
    r = w["w_red"].shape[-1]

    @jax.jit
    def run(h):
        def step(window, pos):
            out, window = F.grassmann_mix_step(h[..., pos, :], window, pos, offsets=offsets, **w)
            return window, out

        window = F.init_grassmann_window(h.shape[:-2], offsets, r)
        _, outs = jax.lax.scan(step, window, jnp.arange(h.shape[-2]))
        return jnp.moveaxis(outs, 0, -2)

    return run(h)


def weights(d, r, seed=0, identity=False):
    rng = np.random.default_rng(seed)
    normal = lambda *s: rng.normal(size=s).astype(np.float32)
    w = dict(w_red=normal(d, r) / np.sqrt(d), b_red=np.zeros(r, np.float32),
             w_plu=normal(F.num_plucker_coords(r), d) / np.sqrt(r), b_plu=0.1 * normal(d),
             w_gate=normal(2 * d, d) / np.sqrt(2 * d), b_gate=0.1 * normal(d))
    if identity:  # z = h exactly, so the test controls the angles between reduced states
        w["w_red"] = np.eye(d, r, dtype=np.float32)
    return {k: jnp.asarray(v) for k, v in w.items()}


def orthonormal(n, r, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(r, n)))
    return q.T  # (n, r) orthonormal rows


def nearly_parallel(angle, T=24, r=8):
    """z_t = a + angle·(t b + t²/T c): consecutive states at an angle of about `angle`."""
    a, b, c = orthonormal(3, r, seed=1)
    t = np.arange(T)[:, None]
    return (a + angle * (t * b + t * t / T * c)).astype(np.float32)


def cases():
    r = 8
    rng = np.random.default_rng(0)
    out = {f"angle-{a:.0e}": (nearly_parallel(a), (1, 2, 4), r) for a in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)}
    # Growing norms: the pair's rescaled states differ by a power of two, so their difference is no longer exact.
    out["angle-1e-04-growing"] = (nearly_parallel(1e-4) * 1.4 ** np.arange(24)[:, None], (1, 2, 4), r)
    base = rng.normal(size=(1, r)).astype(np.float32)
    out["repeated"] = (np.tile(base, (16, 1)), (1, 2, 4), r)
    out["repeated-and-negated"] = (np.concatenate([base, -base, base, 2 * base] * 4), (1, 2, 3), r)
    for s in (1e-8, 1e-4, 1e4, 1e10):
        out[f"scale-{s:g}"] = ((s * rng.normal(size=(2, 20, r))).astype(np.float32), (1, 2, 4, 8), r)
    out["zero-row"] = (rng.normal(size=(12, r)).astype(np.float32) * (np.arange(12) != 5)[:, None], (1, 2, 3), r)
    out["rank-2"] = (rng.normal(size=(16, 2)).astype(np.float32), (1, 2, 4), 2)
    out["T-1"] = (rng.normal(size=(3, 1, r)).astype(np.float32), (1, 2), r)
    out["T-below-offsets"] = (rng.normal(size=(3, r)).astype(np.float32), (4, 8), r)
    out["repeated-offsets"] = (rng.normal(size=(20, r)).astype(np.float32), (1, 2, 8, 8, 8), r)
    return out


CASES = cases()


@pytest.mark.parametrize("name", list(CASES))
def test_every_path_agrees_with_the_float64_oracle(name):
    h, offsets, r = CASES[name]
    d, T = r, h.shape[-2]
    w = weights(d, r, identity=True)
    out64, g64, sin = oracle(h, w, offsets)
    bound = g_bound(w, sin, offsets, T, r)[..., None]  # (..., T, 1)
    h32 = jnp.asarray(h)
    scale = np.abs(h).max() + 1.0
    for path, fn in (("fast", F.grassmann_mix), ("reference", F.grassmann_mix_reference)):
        out, inter = fn(h32, offsets=offsets, return_intermediates=True, **w)
        err = np.abs(np.asarray(inter["g"], np.float64) - g64)
        assert np.all(err <= bound), f"{path}: g off by {err.max():.3g}, bound {bound.min():.3g}"
        np.testing.assert_allclose(out, out64, atol=float(bound.max()) + 4 * EPS32 * scale, rtol=0,
                                   err_msg=path)
        # The plucker_norm intermediate is ‖z_t ∧ z_{t-δ}‖, accurate relative to ‖z_t‖ ‖z_{t-δ}‖.
        norms = np.linalg.norm(np.asarray(inter["z"], np.float64), axis=-1)
        pair_scale = np.stack([norms * np.roll(norms, delta, -1) for delta in offsets], -1)
        expected = np.where(F.offset_validity(offsets, T), sin * pair_scale, 0.0)
        np.testing.assert_array_less(np.abs(np.asarray(inter["plucker_norm"], np.float64) - expected),
                                     8 * r * EPS32 * pair_scale + 1e-30, err_msg=path)
    streamed = stream(h32, w, offsets)
    np.testing.assert_allclose(streamed, out64, atol=float(bound.max()) + 4 * EPS32 * scale, rtol=0,
                               err_msg="decode step")


@pytest.mark.parametrize("name", ["angle-1e-06", "repeated", "repeated-and-negated", "scale-1e-08", "scale-1e+10",
                                  "zero-row", "T-1", "T-below-offsets"])
@pytest.mark.parametrize("fn", [F.grassmann_mix, F.grassmann_mix_reference], ids=["fast", "reference"])
def test_gradients_are_finite_on_adversarial_inputs(name, fn):
    h, offsets, r = CASES[name]
    w = weights(r, r, identity=True)
    loss = lambda h, w: jnp.sum(fn(h / (1.0 + jnp.abs(jax.lax.stop_gradient(h)).max()), offsets=offsets, **w) ** 2)
    grads = jax.grad(loss, argnums=(0, 1))(jnp.asarray(h), w)
    for leaf in jax.tree_util.tree_leaves(grads):
        assert bool(jnp.all(jnp.isfinite(leaf))), name


def test_exactly_repeated_states_contribute_exactly_nothing():
    h, offsets, r = CASES["repeated-and-negated"]
    w = weights(r, r, identity=True)
    _, inter_fast = F.grassmann_mix(jnp.asarray(h), offsets=offsets, return_intermediates=True, **w)
    for fn in (F.grassmann_mix, F.grassmann_mix_reference):
        _, inter = fn(jnp.asarray(h), offsets=offsets, return_intermediates=True, **w)
        # Every pair is parallel, so every p̂ is 0 and g is b_plu (0 at t = 0), up to the rounding of the mean.
        np.testing.assert_allclose(inter["g"][1:], np.broadcast_to(w["b_plu"], inter["g"][1:].shape),
                                   rtol=2 * EPS32, atol=0)
        np.testing.assert_array_equal(inter["plucker_norm"], 0.0)
    np.testing.assert_array_equal(inter_fast["w"], 0.0)  # the collapsed partner: exactly nothing


def test_plucker_norm_keeps_its_digits():
    rng = np.random.default_rng(3)
    u = jnp.asarray(rng.normal(size=(1000, 16)), jnp.float32)
    np.testing.assert_array_equal(F.plucker_norm(u, u), 0.0)  # the Lagrange identity gave up to 6.8e-3
    np.testing.assert_array_equal(F.plucker_norm(u, -2 * u), 0.0)  # rescaling by powers of two is exact
    scale = np.linalg.norm(u, axis=-1) * np.linalg.norm(3 * u, axis=-1)
    assert np.all(np.asarray(F.plucker_norm(u, -3 * u)) <= 4 * 16 * EPS32 * scale)  # ~eps, not sqrt(eps)
    a, b = orthonormal(2, 16, seed=4)
    for angle in (1e-2, 1e-4, 1e-5, 1e-7):
        v = np.cos(angle) * a + np.sin(angle) * b
        a32, v32 = jnp.asarray(a, jnp.float32), jnp.asarray(v, jnp.float32)
        exact = np.linalg.norm(plucker64(a32, v32))
        assert abs(float(F.plucker_norm(a32, v32)) - exact) < 4 * 16 * EPS32, angle  # absolute: |a| |v| = 1
    for s in (1e-18, 1e-8, 1e10, 1e18):  # |u|²|v|² would under- or overflow float32
        x, y = (s * rng.normal(size=(2, 8))).astype(np.float32)
        exact = np.linalg.norm(plucker64(x, y))
        np.testing.assert_allclose(float(F.plucker_norm(jnp.asarray(x), jnp.asarray(y))), exact, rtol=1e-5)


def test_large_states_do_not_overflow_into_garbage():
    # |z| ~ 4e9: the Lagrange identity overflowed to inf - inf = NaN, mapped to 0, and g came out ~1e26.
    h = (4e9 * np.random.default_rng(5).normal(size=(24, 8))).astype(np.float32)
    w = weights(8, 8, identity=True)
    _, g64, _ = oracle(h, w, (1, 2, 4))
    for fn in (F.grassmann_mix, F.grassmann_mix_reference):
        _, inter = fn(jnp.asarray(h), offsets=(1, 2, 4), return_intermediates=True, **w)
        np.testing.assert_allclose(inter["g"], g64, atol=1e-4)


def test_fused_attention_zeroes_fully_masked_rows():
    x = jax.random.normal(jax.random.key(0), (1, 4, 1, 2))
    m = jnp.ones((4, 4), bool).at[1].set(False)
    fused = F.scaled_dot_product_attention(x, x, x, causal=False, mask=m)
    explicit, _ = F.scaled_dot_product_attention(x, x, x, causal=False, mask=m, return_weights=True)
    np.testing.assert_array_equal(fused[0, 1], 0.0)  # was the mean of all four values, future ones included
    np.testing.assert_allclose(fused, explicit, rtol=1e-6, atol=1e-6)
    # Causal with more queries than keys: the first query rows see no key at all.
    q = jax.random.normal(jax.random.key(1), (2, 5, 2, 3))
    kv = jax.random.normal(jax.random.key(2), (2, 3, 2, 3))
    fused = F.scaled_dot_product_attention(q, kv, kv, causal=True, mask=jnp.ones((5, 3), bool))
    explicit, _ = F.scaled_dot_product_attention(q, kv, kv, causal=True, mask=jnp.ones((5, 3), bool),
                                                 return_weights=True)
    np.testing.assert_array_equal(fused[:, :2], 0.0)
    np.testing.assert_allclose(fused, explicit, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixer", ["attention", "grassmann"])
def test_a_repeated_character_gives_finite_logits_equal_to_full_recompute(mixer):
    # 'eeee...': reduced states that differ only through the position embedding (nearly parallel).
    cfg = ModelConfig(vocab_size=11, block_size=64, num_layers=2, d_model=16, num_heads=2, d_ff=32, rank=4,
                      offsets=(1, 2, 4, 8), mixer=mixer)
    model = build_model(cfg, seed=0)
    tokens = jnp.full((2, 64), 7, jnp.int32)
    full = jax.jit(lambda t: model(t))(tokens)
    P = 3
    logits, _ = generation.teacher_forced_logits(model, tokens, P)  # positions P-1 .. T-1
    assert bool(jnp.all(jnp.isfinite(full))) and bool(jnp.all(jnp.isfinite(logits)))
    np.testing.assert_allclose(logits, full[:, P - 1 :], rtol=1e-4, atol=1e-5)
