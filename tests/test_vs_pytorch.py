"""The PyTorch port computes what grassjax computes, and benchmark_vs_pytorch runs end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="pip install -e .[torch]")

from experiments.benchmarks import benchmark_vs_pytorch, benchmark_vs_pytorch_gpu  # noqa: E402
from grassjax.bench import torch_port  # noqa: E402
from grassjax.bench.vs_pytorch import run_vs_pytorch_benchmark  # noqa: E402
from grassjax.nn import ModelConfig, build_model  # noqa: E402
from grassjax.train.optim import train_hparams  # noqa: E402
from grassjax.train.step import cross_entropy, init_train_state, make_train_step  # noqa: E402

# init_std 0.2: logits far from uniform, so a wrong layer shows in the loss.
SMALL = dict(vocab_size=65, block_size=32, num_layers=2, d_model=32, num_heads=4, d_ff=64, rank=8,
             offsets=(1, 2, 4, 8), init_std=0.2)


@pytest.mark.parametrize("mixer, norm", [("attention", "pre"), ("attention", "post"), ("grassmann", "pre"),
                                         ("grassmann", "post")])
def test_same_weights_same_loss_and_same_training(mixer, norm):
    cfg = ModelConfig(**SMALL, mixer=mixer, norm=norm)
    model = build_model(cfg, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    x_np, y_np = rng.integers(0, 65, (3, 32)), rng.integers(0, 65, (3, 32))
    x, y = jnp.asarray(x_np, jnp.int32), jnp.asarray(y_np, jnp.int32)
    xt, yt = torch.as_tensor(x_np), torch.as_tensor(y_np)

    port = torch_port.LanguageModel(cfg)
    torch_port.load_params(port, params)
    with torch.no_grad():
        torch_loss = torch.nn.functional.cross_entropy(port(xt).reshape(-1, 65), yt.reshape(-1))
    assert abs(float(cross_entropy(model(x), y)) - float(torch_loss)) < 1e-4

    # Three AdamW steps (warmup, decay on matrices, clipping) keep the two in step.
    from experiments.shakespeare import grassmann_shakespeare

    train_cfg = grassmann_shakespeare().train
    train_cfg.update(learning_rate=1e-2, warmup_steps=1, steps=10, grad_clip=0.5)
    hparams = train_hparams(train_cfg)
    step = make_train_step(graphdef, dropout=0.0)
    state = init_train_state(params, hparams)
    opt, sched = torch_port.make_optimizer(port, train_cfg)
    torch_step = torch_port.make_train_step(port, opt, sched, grad_clip=0.5)
    for i in range(3):
        state, metrics = step(state, x, y, hparams)
        loss = torch_step(xt, yt)
        assert abs(float(metrics["loss"]) - float(loss)) < 1e-4, i


def test_load_params_refuses_a_model_of_another_shape():
    params = nnx.state(build_model(ModelConfig(**SMALL, mixer="grassmann"), seed=0), nnx.Param)
    with pytest.raises(ValueError, match="shape"):
        torch_port.load_params(torch_port.LanguageModel(ModelConfig(**{**SMALL, "rank": 4})), params)
    with pytest.raises(ValueError, match="covers model.mixer"):
        torch_port.LanguageModel(ModelConfig(**SMALL, grassmann_partner_mix="per_offset"))
    with pytest.raises(KeyError, match="no JAX parameter"):
        torch_port.load_params(torch_port.LanguageModel(ModelConfig(**SMALL, mixer="attention")), params)


def test_benchmark_vs_pytorch_tiny_run(tmp_path):
    cfg = benchmark_vs_pytorch()
    cfg.model.update(num_layers=1, d_model=16, num_heads=2, d_ff=32, rank=4, offsets=(1, 2))
    cfg.bench.update(seq_lens=(16,), batch_sizes=(2,), frameworks=("jax", "torch"), reps=3, warmup=1)
    results = run_vs_pytorch_benchmark(cfg, workdir=tmp_path, exp_name="benchmark_vs_pytorch",
                                       wandb_mode="disabled")
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["mixer"], r["framework"]): r for r in saved["rows"]}
    assert set(rows) == {(m, f) for m in ("attention", "grassmann") for f in ("jax", "torch")}
    for r in rows.values():
        assert r["step_ms"] > 0 and r["reps"] == 3 and r["p25_ms"] <= r["step_ms"] <= r["p75_ms"]
        assert r["tokens_per_s"] == pytest.approx(32 / (r["step_ms"] / 1e3))
    assert rows[("grassmann", "torch")]["over_torch_eager"] == 1.0
    assert abs(rows[("grassmann", "jax")]["first_loss"] - rows[("grassmann", "torch")]["first_loss"]) < 1e-4
    assert "| 16 | 2 | grassmann | jax |" in results["table"]
    # The run sets the float32 matmul precision on both sides for itself only.
    assert torch.get_float32_matmul_precision() == "highest"
    assert saved["environment"]["torch_device"] == "cpu"


def test_benchmark_vs_pytorch_refuses_what_it_cannot_run(tmp_path):
    cfg = benchmark_vs_pytorch()
    cfg.bench.matmul_precision = "fast"
    with pytest.raises(SystemExit, match="highest or tensorfloat32"):
        run_vs_pytorch_benchmark(cfg, workdir=tmp_path, exp_name="x", wandb_mode="disabled")
    if not torch.cuda.is_available():
        cfg = benchmark_vs_pytorch_gpu()
        with pytest.raises(SystemExit, match="torch_device=cpu"):
            run_vs_pytorch_benchmark(cfg, workdir=tmp_path, exp_name="x", wandb_mode="disabled")


@pytest.mark.parametrize("mixer, dropout, attn_dropout", [("attention", 0.0, 0.5), ("attention", 0.2, 0.0),
                                                          ("grassmann", 0.2, 0.0)])
def test_the_port_has_the_same_dropouts(mixer, dropout, attn_dropout):
    """nanoGPT's dropouts (attention probabilities, residual branches, feed-forward output, embeddings):
    off, the two compute the same loss; on, the same loss on average over masks (masks are drawn
    differently by each framework, so only their distribution can agree)."""
    cfg = ModelConfig(**SMALL, mixer=mixer, dropout=dropout, attn_dropout=attn_dropout)
    model = build_model(cfg, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    x_np, y_np = rng.integers(0, 65, (8, 32)), rng.integers(0, 65, (8, 32))
    x, y = jnp.asarray(x_np, jnp.int32), jnp.asarray(y_np, jnp.int32)
    port = torch_port.LanguageModel(cfg)
    torch_port.load_params(port, params)
    xt, yt = torch.as_tensor(x_np), torch.as_tensor(y_np)
    loss_t = lambda: float(torch.nn.functional.cross_entropy(port(xt).reshape(-1, 65), yt.reshape(-1)))
    with torch.no_grad():
        port.eval()
        clean = loss_t()
        assert abs(float(cross_entropy(model(x), y)) - clean) < 1e-4
        port.train()
        torch.manual_seed(0)
        torch_draws = np.array([loss_t() for _ in range(64)])

    @jax.jit
    def dropped(key):
        return cross_entropy(nnx.merge(graphdef, params)(x, deterministic=False,
                                                         rngs=nnx.Rngs(dropout=key)), y)

    jax_draws = np.array([float(dropped(jax.random.key(i))) for i in range(64)])
    assert jax_draws.std() > 0.01 and torch_draws.std() > 0.01  # dropout is on, in both
    se = np.sqrt((jax_draws.var() + torch_draws.var()) / 64)  # of the difference of the two means
    assert abs(jax_draws.mean() - torch_draws.mean()) < 4 * se, (jax_draws.mean(), torch_draws.mean(), se)
    # Same spread too: a rate applied twice, or to another tensor, changes it.
    assert 0.6 < jax_draws.std() / torch_draws.std() < 1.6, (jax_draws.std(), torch_draws.std())


def test_attention_dropout_is_off_without_a_key_and_drops_with_one():
    from grassjax import functional as F

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 4, 8)) for i in range(3))
    plain = F.scaled_dot_product_attention(q, k, v, causal=True)
    same = F.scaled_dot_product_attention(q, k, v, causal=True, dropout_rate=0.5)  # no key: off
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(same))
    key = jax.random.key(7)
    dropped = F.scaled_dot_product_attention(q, k, v, causal=True, dropout_rate=0.5, dropout_key=key)
    _, weights = F.scaled_dot_product_attention(q, k, v, causal=True, return_weights=True)
    keep = jax.random.bernoulli(key, 0.5, weights.shape)  # the mask it draws: the explicit formula
    expected = jnp.einsum("bhts,bshd->bthd", jnp.where(keep, weights / 0.5, 0), v)
    np.testing.assert_allclose(np.asarray(dropped), np.asarray(expected), atol=1e-5)
    assert not np.allclose(np.asarray(dropped), np.asarray(plain))
