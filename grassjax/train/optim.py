"""AdamW with warmup + cosine decay, global-norm clipping, decay on matrices only.

The optimizer's numbers reach the jitted train step as data (`TrainHparams`, 0-d arrays), not as
constants baked into the program. So runs that differ only in them -- a learning-rate sweep, a
longer schedule, another seed -- share one compiled step (XLA's persistent cache finds it), and a
tuning trial compiles nothing new. The step computes exactly the floats it computed when they were
constants (optax's schedule, op for op).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainHparams:
    """The train step's numeric settings, from the `train` config section (`train_hparams`).

    Array fields are data to the compiled step; the betas are static (part of the program), because
    optax's `1 - beta` on a Python float rounds differently from the same on a float32 array."""

    learning_rate: jax.Array  # peak, after warmup
    warmup_steps: jax.Array  # float32, a whole number >= 0
    decay_steps: jax.Array  # float32: the cosine's length after warmup, >= 1
    alpha: jax.Array  # min_lr / learning_rate, rounded from float64 as optax does
    one_minus_alpha: jax.Array  # 1 - alpha, likewise
    weight_decay: jax.Array
    grad_clip: jax.Array  # global-norm clip; inf when the config turns clipping off (<= 0)
    seed: jax.Array  # uint32: dropout masks are drawn from fold_in(key(seed), step)
    beta1: float = struct.field(pytree_node=False, default=0.9)
    beta2: float = struct.field(pytree_node=False, default=0.95)


def _schedule_constants(learning_rate: float, min_lr: float, warmup_steps: int,
                        steps: int) -> dict[str, float]:
    """optax.warmup_cosine_decay_schedule's Python-side numbers, in float64 as it computes them."""
    warmup = max(0, min(int(warmup_steps), int(steps) - 1))
    alpha = 0.0 if learning_rate == 0.0 else min_lr / learning_rate
    return dict(warmup_steps=float(warmup), decay_steps=float(max(int(steps), warmup + 1) - warmup),
                alpha=alpha, one_minus_alpha=1 - alpha)


def train_hparams(train_cfg) -> TrainHparams:
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    constants = _schedule_constants(train_cfg.learning_rate, train_cfg.min_lr,
                                    train_cfg.warmup_steps, train_cfg.steps)
    return TrainHparams(
        learning_rate=f32(train_cfg.learning_rate), **{k: f32(v) for k, v in constants.items()},
        weight_decay=f32(train_cfg.weight_decay),
        grad_clip=f32(train_cfg.grad_clip if train_cfg.grad_clip > 0 else math.inf),
        seed=jnp.asarray(train_cfg.seed, jnp.uint32), beta1=float(train_cfg.beta1),
        beta2=float(train_cfg.beta2))


def warmup_cosine(count, *, learning_rate, warmup_steps, decay_steps, alpha, one_minus_alpha):
    """optax.warmup_cosine_decay_schedule(0, learning_rate, warmup, warmup + decay_steps, min_lr)
    at `count`, written as XLA compiles optax's constant version, so that array arguments give the
    same floats.

    XLA turns a division by a constant into a product with its reciprocal and folds the constants
    together (pi / T), so this is written that way; a plain division by an array rounds differently
    at many steps (checked against optax, jitted, in tests/test_train.py)."""
    # Linear warmup (optax.polynomial_schedule, power 1): (init - end) * (1 - count / T) + end,
    # init = 0.
    frac = 1 - jnp.clip(count, 0, warmup_steps) * (1 / jnp.maximum(warmup_steps, 1))
    rising = (0.0 - learning_rate) * frac + learning_rate
    # Cosine (optax.cosine_decay_schedule) on count - warmup.
    t = jnp.minimum(count - warmup_steps, decay_steps)
    cosine = 0.5 * (1 + jnp.cos(t * (jnp.pi * (1 / decay_steps))))
    decayed = learning_rate * (one_minus_alpha * cosine + alpha)
    return jnp.where(count < warmup_steps, rising, decayed)


def hparams_schedule(hp: TrainHparams) -> optax.Schedule:
    """The learning rate at a step, from `hp`: what the train step uses, and what the loop logs."""
    return lambda count: warmup_cosine(count, learning_rate=hp.learning_rate,
                                       warmup_steps=hp.warmup_steps, decay_steps=hp.decay_steps,
                                       alpha=hp.alpha, one_minus_alpha=hp.one_minus_alpha)


def make_optimizer(hp: TrainHparams) -> optax.GradientTransformation:
    """The optimizer every experiment uses.

    Works on concrete `train_hparams` (to init its state) and on traced ones inside the train step;
    the state's structure does not depend on the values."""
    # Decay matrices (ndim >= 2, embeddings included), not biases or LayerNorm scales: nanoGPT's
    # rule.
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        # a no-op at inf (its state is empty, as identity's is)
        optax.clip_by_global_norm(hp.grad_clip),
        optax.adamw(hparams_schedule(hp), b1=hp.beta1, b2=hp.beta2, weight_decay=hp.weight_decay,
                    mask=decay_mask),
    )
