"""The order-keeping Grassmann variant (per-offset partner mixing M_δ before the wedge collapse).

Checks: fast == literal reference, M = I is the paper's layer, a hand-worked example, the variant sees
the order the paper's mean forgets, causality, gradients, the streaming step, and the model option
(parameter count, identical to the paper at init, streaming decode == full recompute).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from grassjax import generation
from grassjax import functional as F
from grassjax.nn import ModelConfig, analytic_param_count, build_model, param_counts
from tests.test_functional_grassmann import relative_error, random_weights


def _mix(key, m, r, scale=0.5):
    return jnp.eye(r) + scale * jax.random.normal(key, (m, r, r))


# One shape and offset set (unsorted, with a repeat) for the functional tests, so that they share compilations.
SHAPE, R, OFFSETS = (2, 12, 8), 4, (3, 1, 3)
H = jax.random.normal(jax.random.key(0), SHAPE)
W = random_weights(jax.random.key(1), SHAPE[-1], R)
M = _mix(jax.random.key(2), len(OFFSETS), R)


def test_fast_equals_literal_reference():
    fast, fi = F.grassmann_mix(H, offsets=OFFSETS, partner_mix=M, return_intermediates=True, **W)
    ref, ri = F.grassmann_mix_reference(H, offsets=OFFSETS, partner_mix=M, return_intermediates=True, **W)
    assert relative_error(fast, ref) < 1e-5
    assert relative_error(fi["g"], ri["g"]) < 1e-5


def test_identity_mixing_is_the_papers_layer():
    eye = jnp.broadcast_to(jnp.eye(R), M.shape)
    for fn in (F.grassmann_mix, F.grassmann_mix_reference):
        np.testing.assert_allclose(fn(H, offsets=OFFSETS, partner_mix=eye, **W), fn(H, offsets=OFFSETS, **W),
                                   rtol=1e-6, atol=1e-6)


def test_hand_worked_swap_matrix():
    # d = r = 2, identity reduce, offset 1, z_0 = (1, 0), z_1 = (3, 2). With a = z_1/‖z_1‖ = (3, 2)/√13,
    # the normalised partner is the part of z_0 orthogonal to a, scaled to a ∧ d̂ = p̂:
    #   d = z_0 - (a·z_0) a = (4, -6)/13, sin θ = ‖d‖ = 2/√13, d̂ = d / sin θ = (2, -3)/√13,
    #   paper: a ∧ d̂ = (3·(-3) - 2·2)/13 = -1 (the sign of the 2x2 determinant 3·0 - 2·1).
    # M swaps the coordinates: d̂ M = (-3, 2)/√13 and a ∧ d̂ M = (3·2 - 2·(-3))/13 = 12/13.
    # W_plu = [[1, -1]] -> g_1 = (12/13, -12/13); zero gate weights -> out = (h + g) / 2.
    h = jnp.array([[1.0, 0.0], [3.0, 2.0]])
    weights = dict(w_red=jnp.eye(2), b_red=jnp.zeros(2), w_plu=jnp.array([[1.0, -1.0]]), b_plu=jnp.zeros(2),
                   w_gate=jnp.zeros((4, 2)), b_gate=jnp.zeros(2))
    swap = jnp.array([[[0.0, 1.0], [1.0, 0.0]]])
    for fn in (F.grassmann_mix, F.grassmann_mix_reference):
        out, inter = fn(h, offsets=(1,), partner_mix=swap, return_intermediates=True, **weights)
        np.testing.assert_allclose(inter["g"], [[0.0, 0.0], [12 / 13, -12 / 13]], atol=1e-6)
        np.testing.assert_allclose(out, [[0.5, 0.0], [(3 + 12 / 13) / 2, (2 - 12 / 13) / 2]], atol=1e-6)
        _, paper = fn(h, offsets=(1,), return_intermediates=True, **weights)
        np.testing.assert_allclose(paper["g"][1], [-1.0, 1.0], atol=1e-6)


def test_variant_sees_the_order_the_mean_forgets():
    # With offsets {1, 3}, position 5's feature is z_5 ∧ (ẑ_4 + ẑ_2): swapping h_4 and h_2 leaves it
    # unchanged in the paper's layer. Per-offset matrices tell the two partners apart.
    swapped = H[:, jnp.array([0, 1, 4, 3, 2] + list(range(5, SHAPE[1])))]
    for mix, order_matters in ((None, False), (M[1:], True)):
        a, b = (F.grassmann_mix(x, offsets=(1, 3), partner_mix=mix, **W)[:, 5] for x in (H, swapped))
        assert np.allclose(a, b, rtol=1e-5, atol=1e-5) != order_matters


@pytest.mark.parametrize("fn", [F.grassmann_mix, F.grassmann_mix_reference])
def test_variant_is_causal(fn):
    out = fn(H, offsets=OFFSETS, partner_mix=M, **W)
    out2 = fn(H.at[:, 7:].set(3.0), offsets=OFFSETS, partner_mix=M, **W)
    np.testing.assert_array_equal(out[:, :7], out2[:, :7])
    assert not np.allclose(out[:, 7:], out2[:, 7:])


def test_variant_gradients_float64_and_shape_check():
    with jax.enable_x64(True):
        h = jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
        w = random_weights(jax.random.key(1), 3, 3, dtype=jnp.float64)
        M = _mix(jax.random.key(2), 2, 3).astype(jnp.float64)
        check_grads(lambda M: F.grassmann_mix(h, offsets=(1, 2), partner_mix=M, **w), (M,), order=1,
                    modes=("rev",), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="partner_mix"):
        F.grassmann_mix(h.astype(jnp.float32), offsets=(1, 2, 4), partner_mix=M.astype(jnp.float32),
                        **random_weights(jax.random.key(1), 3, 3))


def test_step_equals_full_at_every_position():
    B, T, _ = SHAPE
    full = F.grassmann_mix(H, offsets=OFFSETS, partner_mix=M, **W)

    @jax.jit
    def stream(h):
        def step(window, pos):
            out, window = F.grassmann_mix_step(h[:, pos], window, pos, offsets=OFFSETS, partner_mix=M, **W)
            return window, out

        _, outs = jax.lax.scan(step, F.init_grassmann_window((B,), OFFSETS, R), jnp.arange(T))
        return jnp.swapaxes(outs, 0, 1)

    np.testing.assert_allclose(stream(H), full, rtol=1e-5, atol=1e-5)


SMALL = dict(vocab_size=11, block_size=20, num_layers=2, d_model=16, num_heads=2, d_ff=32, rank=4, offsets=(1, 2, 4),
             init_std=0.2)


def test_model_option_param_count_causality_and_streaming():
    cfg = ModelConfig(**SMALL, grassmann_partner_mix="per_offset")
    model = build_model(cfg, seed=0)
    assert param_counts(model)["total"] == analytic_param_count(cfg) == \
        analytic_param_count(cfg.replace(grassmann_partner_mix="none")) + 2 * 3 * 4 * 4
    per_layer = cfg.replace(offsets=(1, 4), offsets_per_layer=True)
    assert param_counts(nnx.eval_shape(lambda: build_model(per_layer)))["total"] == analytic_param_count(per_layer)
    with pytest.raises(ValueError, match="grassmann_partner_mix"):
        ModelConfig(grassmann_partner_mix="full")
    # A = 0 at init: every M_δ is I, the paper's layer (whose equality with the plain layer is tested above).
    np.testing.assert_array_equal(model.blocks[0].mixer.partner_mix_matrices(), jnp.broadcast_to(jnp.eye(4), (3, 4, 4)))

    forward = jax.jit(lambda m, t: m(t))  # one compilation for both parameter values below
    tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, 11)
    at_init = forward(model, tokens)
    for i, block in enumerate(model.blocks):  # matrices far from I, so a path that ignored them would show
        a = block.mixer.partner_mix
        a[...] = 0.5 * jax.random.normal(jax.random.key(i), a.shape)
    logits = forward(model, tokens)
    assert not np.allclose(logits, at_init, atol=1e-3)
    changed = tokens.at[:, 9:].set((tokens[:, 9:] + 3) % 11)
    np.testing.assert_array_equal(logits[:, :9], forward(model, changed)[:, :9])

    prompt, key = tokens[:, :2], jax.random.key(3)
    expected = generation.generate(model, prompt, key, max_new_tokens=18, temperature=1.0)
    got = generation.generate_streaming(model, prompt, key, max_new_tokens=18, temperature=1.0)
    np.testing.assert_array_equal(got, expected)
    assert len(set(np.asarray(got[:, 2:]).ravel().tolist())) > 2


def test_scalar_control_is_a_weighted_mean_of_partners():
    # M_δ = (1 + s_δ) I: the same as passing those scaled identities, and (with s = 0) the paper's layer.
    cfg = ModelConfig(**SMALL, grassmann_partner_mix="per_offset_scalar")
    assert param_counts(nnx.eval_shape(lambda: build_model(cfg)))["total"] == analytic_param_count(cfg) == \
        analytic_param_count(cfg.replace(grassmann_partner_mix="none")) + 2 * 3
    mixer = build_model(cfg, seed=0).blocks[0].mixer
    mixer.partner_mix[...] = jnp.array([0.5, -0.25, 2.0])
    np.testing.assert_allclose(mixer.partner_mix_matrices(), jnp.array([1.5, 0.75, 3.0])[:, None, None] * jnp.eye(4))
