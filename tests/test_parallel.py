"""Data parallelism on 4 simulated CPU devices (XLA_FLAGS), gradient accumulation, checkpoint portability.

JAX fixes its device count at import, so the multi-device checks run in a subprocess.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from grassjax.train.config import default_config
from grassjax.train.parallel import ParallelConfigError, batch_layout
from tests.conftest import REPO, TINY_OVERRIDES

FOUR_DEVICES = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONUNBUFFERED": "1"}

SCRIPT = textwrap.dedent('''
    import sys, tempfile
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from grassjax.nn import ModelConfig, build_model
    from grassjax.train.checkpoint import Checkpointer
    from grassjax.train.parallel import make_mesh, replicate, shard_global_batch
    from grassjax.train.config import default_config
    from grassjax.train.optim import train_hparams
    from grassjax.train.step import TrainState, make_train_step

    assert jax.device_count() == 4, jax.devices()
    cfg = ModelConfig(vocab_size=13, block_size=16, num_layers=1, d_model=16, num_heads=2, d_ff=32, rank=4,
                      offsets=(1, 2), mixer=sys.argv[1])
    graphdef, params = nnx.split(build_model(cfg), nnx.Param)
    tx = optax.sgd(0.5, momentum=0.9)  # Adam would amplify float noise in near-zero gradients
    rng = np.random.default_rng(0)
    x = rng.integers(0, 13, (8, 16)).astype(np.int32)
    y = rng.integers(0, 13, (8, 16)).astype(np.int32)

    def fresh_state(mesh):  # copies: the train step donates (deletes) its input buffers
        p = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), params)
        return replicate(TrainState(p, tx.init(p), jnp.zeros((), jnp.int32)), mesh)

    def run(devices, accum=1, steps=3):
        mesh = make_mesh(jax.devices()[:devices])
        hparams = replicate(train_hparams(default_config().train), mesh)  # only its seed is used (no dropout)
        state = fresh_state(mesh)
        step = make_train_step(graphdef, dropout=0.0, grad_accum_steps=accum, optimizer=lambda _: tx)
        xs, ys = shard_global_batch(x, mesh), shard_global_batch(y, mesh)
        assert len(xs.sharding.device_set) == devices
        losses = []
        for _ in range(steps):
            state, metrics = step(state, xs, ys, hparams)
            losses.append(float(metrics["loss"]))
        return state, losses

    one, losses1 = run(1)
    four, losses4 = run(4)
    np.testing.assert_allclose(losses4, losses1, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), four.params, one.params)
    accum, losses_accum = run(4, accum=2)
    np.testing.assert_allclose(losses_accum, losses1, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), accum.params, one.params)

    # Saved from 4 devices, restored onto 1.
    folder = tempfile.mkdtemp()
    Checkpointer(folder).save(four)
    template = fresh_state(make_mesh(jax.devices()[:1]))
    restored = Checkpointer(folder).restore(template)
    leaf = jax.tree_util.tree_leaves(restored.params)[0]
    assert len(leaf.sharding.device_set) == 1
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, four)
    print("OK", losses1)
''')


@pytest.mark.parametrize("mixer", ["attention", "grassmann"])
def test_four_device_step_equals_one_device_step(mixer):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mixer], capture_output=True, text=True, env=FOUR_DEVICES,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


def test_training_loop_runs_data_parallel_on_four_devices(tmp_path, text_data_dir):
    flags = [f"--config.{k}={v}" for k, v in {**TINY_OVERRIDES, "train.steps": "4", "train.eval_every": "4",
                                               "train.grad_accum_steps": "2"}.items()]
    proc = subprocess.run([sys.executable, str(REPO / "launch.py"), "--exp=grassmann_shakespeare",
                           f"--workdir={tmp_path / 'run'}", f"--data_dir={text_data_dir}", "--wandb_mode=disabled",
                           *flags], capture_output=True, text=True, env=FOUR_DEVICES, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 device(s) x 1 rows x 2 accumulation step(s)" in proc.stdout


def test_batch_layout_is_explicit_and_checked():
    cfg = default_config().train
    cfg.batch_size, cfg.grad_accum_steps = 32, 2
    layout = batch_layout(cfg, num_devices=4, num_processes=2)
    assert (layout.global_batch, layout.per_device_batch, layout.local_batch, layout.microbatch) == (32, 4, 16, 16)
    cfg.per_device_batch_size = 3
    assert batch_layout(cfg, num_devices=4, num_processes=1).global_batch == 24
    cfg.per_device_batch_size, cfg.batch_size = 0, 30
    with pytest.raises(ParallelConfigError, match="train.batch_size=30 must be divisible"):
        batch_layout(cfg, num_devices=4, num_processes=1)
