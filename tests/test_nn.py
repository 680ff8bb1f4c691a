"""grassjax.nn: parameter counts, causality of every model, dtypes, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grassjax.nn import ModelConfig, analytic_param_count, build_model, param_counts

SMALL = dict(vocab_size=11, block_size=24, num_layers=2, d_model=16, num_heads=2, d_ff=32, rank=4, offsets=(1, 2, 4))

VARIANTS = {
    "bigram": dict(kind="bigram"),
    "attention-pre": dict(mixer="attention"),
    "attention-post": dict(mixer="attention", norm="post"),
    "grassmann-pre": dict(mixer="grassmann"),
    "grassmann-post": dict(mixer="grassmann", norm="post"),
    "grassmann-per-layer-offsets": dict(mixer="grassmann", offsets=(1, 4), offsets_per_layer=True),
    "grassmann-post-per-layer": dict(mixer="grassmann", norm="post", offsets=(2, 3), offsets_per_layer=True),
    "grassmann-untied-no-outproj": dict(mixer="grassmann", tie_embeddings=False, grassmann_out_proj=False),
    "sliding-window": dict(mixer="sliding_window"),  # window max(offsets) = 4 < T: the window really cuts
    "conv-post-per-layer": dict(mixer="conv", norm="post", offsets=(2, 5), offsets_per_layer=True),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_changing_future_tokens_never_changes_past_logits(name):
    cfg = ModelConfig(**{**SMALL, **VARIANTS[name]})
    model = build_model(cfg, seed=0)
    forward = jax.jit(lambda t: model(t))
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 11)
    t = 13
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 5) % 11)
    a, b = forward(tokens), forward(changed)
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
    assert not np.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the check can fail: the future does change


def test_paper_transformer_has_exactly_12_59m_parameters():
    cfg = ModelConfig(vocab_size=30522, block_size=128, mixer="attention", num_layers=6, d_model=256,
                      num_heads=4, d_ff=1024)
    counts = param_counts(nnx.eval_shape(lambda: build_model(cfg)))
    assert counts["total"] == analytic_param_count(cfg) == 12_585_472
    assert counts["non_embedding"] == 12_585_472 - (30522 + 128) * 256


def test_paper_grassmann_matches_13_00m_with_out_projection():
    cfg = ModelConfig(vocab_size=30522, block_size=128, mixer="grassmann", num_layers=6, d_model=256,
                      num_heads=4, d_ff=1024, rank=32)
    counts = param_counts(nnx.eval_shape(lambda: build_model(cfg)))
    assert counts["total"] == analytic_param_count(cfg) == 13_001_920


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_param_count_matches_formula(name):
    cfg = ModelConfig(**{**SMALL, **VARIANTS[name]})
    assert param_counts(build_model(cfg))["total"] == analytic_param_count(cfg)


@pytest.mark.parametrize("mixer", ["attention", "grassmann"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_under_jit_in_both_dtypes(mixer, dtype):
    cfg = ModelConfig(**{**SMALL, "mixer": mixer, "dtype": dtype})
    model = build_model(cfg)
    tokens = jnp.arange(48).reshape(2, 24) % 11
    logits = jax.jit(lambda t: model(t))(tokens)
    assert logits.shape == (2, 24, 11) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    if dtype == "bfloat16":
        f32 = build_model(cfg.replace(dtype="float32"))(tokens)
        np.testing.assert_allclose(logits, f32, atol=0.1)


def test_init_is_normal_with_configured_std():
    model = build_model(ModelConfig(**{**SMALL, "d_model": 64, "d_ff": 256, "init_std": 0.05}))
    kernel = np.asarray(model.blocks[0].ffn.up.kernel[...])
    assert abs(kernel.std() - 0.05) < 0.005 and abs(kernel.mean()) < 0.005


@pytest.mark.parametrize("mixer", ["attention", "grassmann"])
def test_both_dense_layouts_start_from_the_same_values_and_compute_the_same(mixer):
    """model.dense_layout="out_in" holds nnx.Linear's very kernels, transposed; the Grassmann
    weights keep (in, out)."""
    cfg = ModelConfig(**{**SMALL, "mixer": mixer, "tie_embeddings": False})
    out_in, in_out = build_model(cfg), build_model(cfg.replace(dense_layout="in_out"))
    flat = lambda m: {"/".join(map(str, path)): np.asarray(leaf) for path, leaf in  # noqa: E731
                      jax.tree_util.tree_flatten_with_path(nnx.state(m, nnx.Param))[0]}
    a, b = flat(out_in), flat(in_out)
    assert a.keys() == b.keys()
    transposed = [k for k in a if a[k].shape != b[k].shape or (a[k].ndim == 2 and not
                                                               np.array_equal(a[k], b[k]))]
    assert transposed and all("kernel" in k for k in transposed)
    assert not [k for k in transposed if any(w in k for w in ("reduce", "plucker_proj", "gate"))]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k].T if k in transposed else b[k])
    tokens = jnp.arange(48).reshape(2, 24) % 11
    np.testing.assert_allclose(out_in(tokens), in_out(tokens), rtol=1e-5, atol=1e-5)


def test_dropout_is_random_in_training_and_off_in_eval():
    model = build_model(ModelConfig(**{**SMALL, "dropout": 0.5}))
    tokens = jnp.zeros((1, 8), jnp.int32)
    a = model(tokens, deterministic=False, rngs=nnx.Rngs(dropout=0))
    b = model(tokens, deterministic=False, rngs=nnx.Rngs(dropout=1))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model(tokens), model(tokens))


def test_intermediates_for_statistics():
    tokens = jnp.zeros((2, 10), jnp.int32)
    attn = build_model(ModelConfig(**{**SMALL, "mixer": "attention"}))
    _, inter = attn(tokens, return_intermediates=True)
    assert len(inter) == 2 and inter[0]["weights"].shape == (2, 2, 10, 10) and inter[0]["max_logit"].shape == (2, 2)
    grass = build_model(ModelConfig(**SMALL))
    _, inter = grass(tokens, return_intermediates=True)
    assert inter[1]["alpha"].shape == (2, 10, 16) and inter[1]["plucker_norm"].shape == (2, 10, 3)


@pytest.mark.parametrize("bad, match", [
    (dict(mixer="rnn"), "model.mixer"),
    (dict(d_model=10, num_heads=3), "divisible"),
    (dict(offsets=(1, 2), offsets_per_layer=True, num_layers=3), "one entry per layer"),
    (dict(offsets=(0, 1)), "positive"),
    (dict(dense_layout="row_major"), "model.dense_layout"),
])
def test_bad_config_says_what_to_fix(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**bad)


def test_sequence_longer_than_block_size_is_rejected():
    model = build_model(ModelConfig(**SMALL))
    with pytest.raises(ValueError, match="block_size"):
        model(jnp.zeros((1, 25), jnp.int32))
