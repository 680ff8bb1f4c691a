"""AdamW with warmup + cosine decay, global-norm clipping, decay on matrices only.

The optimizer's numbers reach the jitted train step as data (`TrainHparams`, 0-d arrays), not as constants
baked into the program. So runs that differ only in them -- a learning-rate sweep, a longer schedule, another
seed -- share one compiled step (XLA's persistent cache finds it), and a tuning trial compiles nothing new.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class TrainHparams(NamedTuple):
    """The train step's numeric settings, from the `train` config section (`train_hparams`)."""

    learning_rate: jax.Array  # peak, after warmup
    min_lr: jax.Array  # reached at `steps` by the cosine
    warmup_steps: jax.Array
    steps: jax.Array
    beta1: jax.Array
    beta2: jax.Array
    weight_decay: jax.Array
    grad_clip: jax.Array  # global-norm clip; inf when the config turns clipping off (<= 0)
    seed: jax.Array  # dropout masks are drawn from fold_in(key(seed), step)


def train_hparams(train_cfg) -> TrainHparams:
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return TrainHparams(
        learning_rate=f32(train_cfg.learning_rate), min_lr=f32(train_cfg.min_lr),
        warmup_steps=f32(train_cfg.warmup_steps), steps=f32(train_cfg.steps), beta1=f32(train_cfg.beta1),
        beta2=f32(train_cfg.beta2), weight_decay=f32(train_cfg.weight_decay),
        grad_clip=f32(train_cfg.grad_clip if train_cfg.grad_clip > 0 else math.inf),
        seed=jnp.asarray(train_cfg.seed, jnp.uint32))


def learning_rate_schedule(*, learning_rate, min_lr, warmup_steps, steps) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, then cosine decay to min_lr at `steps` (optax's
    warmup_cosine_decay_schedule, written in jnp so that every argument may be a traced array)."""
    warmup = jnp.clip(jnp.asarray(warmup_steps, jnp.float32), 0, jnp.maximum(steps - 1, 0))
    decay = jnp.maximum(steps, warmup + 1) - warmup  # >= 1

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        rising = learning_rate * count / jnp.maximum(warmup, 1)
        cosine = 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(count - warmup, 0, decay) / decay))
        return jnp.where(count < warmup, rising, min_lr + (learning_rate - min_lr) * cosine)

    return schedule


def make_optimizer(hp: TrainHparams) -> optax.GradientTransformation:
    """The optimizer every experiment uses. Works on concrete `train_hparams` (to init its state) and on traced
    ones inside the train step; the state's structure does not depend on the values."""
    schedule = learning_rate_schedule(learning_rate=hp.learning_rate, min_lr=hp.min_lr,
                                      warmup_steps=hp.warmup_steps, steps=hp.steps)
    # Decay matrices (ndim >= 2, embeddings included), not biases or LayerNorm scales: nanoGPT's rule.
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(hp.grad_clip),  # a no-op at inf (its state is empty, as identity's is)
        optax.adamw(schedule, b1=hp.beta1, b2=hp.beta2, weight_decay=hp.weight_decay, mask=decay_mask),
    )
