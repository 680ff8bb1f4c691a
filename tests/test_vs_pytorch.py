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
