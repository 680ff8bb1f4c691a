"""Streaming generation: the one-position mixers, the caches, and exact agreement with full recomputation."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grassjax import generation
from grassjax import functional as F
from grassjax.nn import ModelConfig, build_model

# init_std 0.2 rather than 0.02: sharper logits, so greedy and sampled tokens are a real test.
# One layer keeps compilation short; the per-layer-offset variants have two, which also covers cache stacking.
SMALL = dict(vocab_size=11, block_size=24, num_layers=1, d_model=16, num_heads=2, d_ff=32, rank=4,
             offsets=(1, 2, 4), init_std=0.2)

VARIANTS = {
    "attention-pre": dict(mixer="attention"),
    "attention-post": dict(mixer="attention", norm="post"),
    "grassmann-pre": dict(mixer="grassmann"),
    "grassmann-post": dict(mixer="grassmann", norm="post"),
    "grassmann-per-layer-offsets": dict(mixer="grassmann", offsets=(1, 5), offsets_per_layer=True, num_layers=2),
    "grassmann-post-per-layer-no-outproj": dict(mixer="grassmann", norm="post", offsets=(3, 2),
                                                offsets_per_layer=True, num_layers=2, grassmann_out_proj=False),
    # The controls: windows (4, and 2 then 5) far shorter than the 24-token text, so the buffers roll over.
    "sliding-window-pre": dict(mixer="sliding_window"),
    "conv-post-per-layer": dict(mixer="conv", norm="post", offsets=(2, 5), offsets_per_layer=True, num_layers=2),
}


@functools.lru_cache(maxsize=None)  # building is slow on CPU (eager init); generation never mutates a model
def _model(name):
    return build_model(ModelConfig(**{**SMALL, **VARIANTS[name]}), seed=0)


def _grassmann_weights(key, d, r):
    ks = jax.random.split(key, 6)
    shapes = dict(w_red=(d, r), b_red=(r,), w_plu=(F.num_plucker_coords(r), d), b_plu=(d,), w_gate=(2 * d, d),
                  b_gate=(d,))
    return {name: 0.5 * jax.random.normal(k, shape) for k, (name, shape) in zip(ks, shapes.items())}


@pytest.mark.parametrize("offsets", [(1, 2, 4, 8, 12, 16), (3, 1, 3)])  # paper default; unsorted with a repeat
def test_grassmann_mix_step_equals_grassmann_mix_at_every_position(offsets):
    B, T, d, r = 2, 20, 8, 5
    weights = _grassmann_weights(jax.random.key(0), d, r)
    h = jax.random.normal(jax.random.key(1), (B, T, d))
    full, inter = F.grassmann_mix(h, **weights, offsets=offsets, return_intermediates=True)

    @jax.jit
    def stream(h):
        def step(window, pos):
            out, window = F.grassmann_mix_step(h[:, pos], window, pos, **weights, offsets=offsets)
            return window, out

        window = F.init_grassmann_window((B,), offsets, r)
        window, outs = jax.lax.scan(step, window, jnp.arange(T))
        return jnp.swapaxes(outs, 0, 1), window  # (B, T, d), (B, M, r)

    outs, window = stream(h)
    np.testing.assert_allclose(outs, full, rtol=1e-5, atol=1e-6)
    assert window.shape == (B, max(offsets), r)
    np.testing.assert_allclose(window, F.grassmann_window_from_states(inter["z"], offsets), rtol=1e-5, atol=1e-6)


def test_grassmann_window_from_a_short_prefix_is_zero_padded_in_front():
    z = jnp.arange(6.0).reshape(1, 3, 2)
    window = F.grassmann_window_from_states(z, (1, 5))
    assert window.shape == (1, 5, 2)
    np.testing.assert_array_equal(window[0, :2], 0)
    np.testing.assert_array_equal(window[0, 2:], z[0])


def test_attention_step_equals_causal_attention_at_every_position():
    B, T, H, D = 2, 9, 2, 4
    q, k, v = jax.random.normal(jax.random.key(0), (3, B, T, H, D))
    full = jax.jit(F.scaled_dot_product_attention)(q, k, v)  # causal by default
    # Each position sees the whole k, v: rows after t must be masked out.
    step = jax.jit(jax.vmap(lambda t: F.attention_step(q[:, t], k, v, t), out_axes=1))
    steps = step(jnp.arange(T))
    np.testing.assert_allclose(steps, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["attention-post", "grassmann-post-per-layer-no-outproj", "sliding-window-pre",
                                  "conv-post-per-layer"])
def test_teacher_forced_decode_logits_match_the_full_forward(name):
    model = _model(name)
    tokens = jax.random.randint(jax.random.key(3), (2, SMALL["block_size"]), 0, SMALL["vocab_size"], jnp.int32)
    P = 3  # shorter than the largest offset: early positions have missing partners
    logits, caches = generation.teacher_forced_logits(model, tokens, P)  # logits for positions P-1 .. T-1
    full = jax.jit(lambda t: model(t))(tokens)  # jitted: an eager forward dispatches (and compiles) op by op
    np.testing.assert_allclose(logits, full[:, P - 1 :], rtol=1e-4, atol=1e-5)
    assert all(int(c["pos"]) == SMALL["block_size"] for c in caches)


GREEDY, SAMPLED, TOP_K = dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_k=5)
CASES = [  # (variant, sampling, prompt length): greedy and sampled, pre and post, shared and per-layer offsets
    ("attention-pre", GREEDY, 4), ("attention-post", SAMPLED, 4),
    ("grassmann-pre", GREEDY, 4), ("grassmann-post", TOP_K, 4),
    ("grassmann-per-layer-offsets", GREEDY, 1), ("grassmann-post-per-layer-no-outproj", SAMPLED, 2),
    ("sliding-window-pre", SAMPLED, 3), ("conv-post-per-layer", GREEDY, 1),
]


@pytest.mark.parametrize("name, setting, P", CASES, ids=[f"{n}-{s}-P{p}" for n, s, p in CASES])
def test_streaming_generation_gives_exactly_the_tokens_of_full_recomputation(name, setting, P):
    model = _model(name)
    prompt = jax.random.randint(jax.random.key(1), (3, P), 0, SMALL["vocab_size"], jnp.int32)
    new = SMALL["block_size"] - P  # fill the whole block: the exact comparison needs no sliding window
    for seed in (0, 1, 2):  # seeds are arguments: no recompilation
        key = jax.random.key(seed)
        expected = generation.generate(model, prompt, key, max_new_tokens=new, **setting)
        got = generation.generate_streaming(model, prompt, key, max_new_tokens=new, **setting)
        assert got.shape == (3, SMALL["block_size"]) and got.dtype == prompt.dtype
        np.testing.assert_array_equal(got, expected, err_msg=f"{name} {setting} seed {seed}")
        assert len(set(np.asarray(got[:, P:]).ravel().tolist())) > 2  # a real test, not a constant run


def test_a_single_new_token_comes_from_the_prefill():
    model = _model("attention-pre")
    prompt = jnp.array([[5, 1, 7], [2, 2, 3]], jnp.int32)
    key = jax.random.key(4)
    np.testing.assert_array_equal(generation.generate_streaming(model, prompt, key, max_new_tokens=1),
                                  generation.generate(model, prompt, key, max_new_tokens=1))


def test_grassmann_state_size_is_independent_of_context_and_kv_cache_grows():
    grass, attn = _model("grassmann-pre"), _model("attention-pre")
    L, B, C = SMALL["num_layers"], 2, SMALL["d_model"]
    M, r = max(SMALL["offsets"]), SMALL["rank"]
    sizes = {n: generation.cache_bytes(grass, B, n) for n in (1, 16, 8192)}
    assert len(set(sizes.values())) == 1
    assert sizes[1] == L * (B * M * r * 4 + 4)  # z window + position counter, per layer
    assert generation.cache_bytes(attn, B, 8192) == L * (2 * B * 8192 * C * 4 + 4)

    # The caches a real prefill returns: same shapes for a 2- and a 20-token prompt (shapes only, no compute).
    def state_shapes(model, P, max_len):
        prompt = jax.ShapeDtypeStruct((B, P), jnp.int32)
        _, caches = jax.eval_shape(lambda p: generation.prefill(model, p, max_len), prompt)
        return [(leaf.shape, leaf.dtype) for leaf in jax.tree_util.tree_leaves(caches)]

    assert state_shapes(grass, 2, 4) == state_shapes(grass, 20, 24)
    assert state_shapes(attn, 2, 4) != state_shapes(attn, 20, 24)


def test_generate_streaming_refuses_to_run_past_the_position_table():
    model = _model("grassmann-pre")
    with pytest.raises(ValueError, match="block_size"):
        generation.generate_streaming(model, jnp.zeros((1, 20), jnp.int32), jax.random.key(0), max_new_tokens=5)


def test_bigram_delegates_to_sampling():
    model = build_model(ModelConfig(**SMALL, kind="bigram"), seed=0)
    prompt = jnp.zeros((2, 3), jnp.int32)
    key = jax.random.key(0)
    np.testing.assert_array_equal(generation.generate_streaming(model, prompt, key, max_new_tokens=5),
                                  generation.generate(model, prompt, key, max_new_tokens=5))
    assert generation.cache_bytes(model, 2, 100) == 0


def test_generation_benchmark_tiny_run_writes_results_and_plot(tmp_path):
    from experiments.benchmarks import benchmark_generation
    from grassjax.bench.decoding import run_generation_benchmark

    cfg = benchmark_generation()
    cfg.model.update(num_layers=1, d_model=16, num_heads=2, d_ff=32, rank=4, offsets=(1, 2, 4))
    cfg.bench.update(contexts=(8, 32), new_tokens=4, reps=1)
    results = run_generation_benchmark(cfg, workdir=tmp_path / "run", exp_name="benchmark_generation",
                                       wandb_mode="disabled")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (tmp_path / "run" / "generation.png").stat().st_size > 1000
    rows = {(r["mixer"], r["context"]): r for r in saved["results"]}
    assert set(rows) == {(m, c) for m in ("attention", "grassmann") for c in (8, 32)}
    assert all(r["decode_tokens_per_s"] > 0 and r["ms_per_token"] > 0 for r in rows.values())
    assert rows["grassmann", 8]["cache_bytes"] == rows["grassmann", 32]["cache_bytes"]
    assert rows["attention", 32]["cache_bytes"] == 4 * rows["attention", 8]["cache_bytes"] - 3 * 4  # + pos counter
    assert results["summary"] == saved["summary"]


@pytest.mark.parametrize("name", ["sliding-window-pre", "conv-post-per-layer"])
def test_control_mixer_state_size_is_independent_of_context(name):
    sizes = {n: generation.cache_bytes(_model(name), 2, n) for n in (1, 16, 8192)}
    assert len(set(sizes.values())) == 1
    if name == "sliding-window-pre":  # K and V for window + 1 = 5 positions, plus the position counter
        assert sizes[1] == 2 * 2 * 5 * SMALL["d_model"] * 4 + 4
    else:  # the last K - 1 = max(offset) inputs per layer: 2 and 5
        assert sizes[1] == (2 + 5) * 2 * SMALL["d_model"] * 4 + 2 * 4


@pytest.mark.parametrize("mixer", ["attention", "grassmann"])
def test_sample_cached_draws_the_tokens_stream_tokens_yields(mixer):
    """The training loop's sample: one compiled program, the same tokens as the streamed decoder, past
    the block (where the recent half is prefilled again)."""
    from grassjax import generation
    from grassjax.nn import ModelConfig, build_model

    cfg = ModelConfig(vocab_size=23, block_size=16, num_layers=2, d_model=32, num_heads=2, d_ff=64, rank=4,
                      offsets=(1, 2, 4), mixer=mixer, init_std=0.3)
    model = build_model(cfg, seed=1)
    key, prompt = jax.random.key(3), np.array([[1, 5, 7]], np.int32)
    streamed = list(generation.stream_tokens(model, prompt[0], key, num_tokens=40, temperature=0.9, top_k=8))
    cached = generation.sample_cached(model, prompt, key, num_tokens=40, temperature=0.9, top_k=8)
    assert cached.shape == (1, 40) and np.asarray(cached[0]).tolist() == streamed
