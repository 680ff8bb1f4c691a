"""AdamW with warmup + cosine decay, global-norm clipping, decay on matrices only."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(*, learning_rate: float, min_lr: float, warmup_steps: int, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, then cosine decay to min_lr at `steps`."""
    warmup_steps = max(0, min(warmup_steps, steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=max(steps, warmup_steps + 1), end_value=min_lr,
    )


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer every experiment uses, from the `train` config section."""
    schedule = learning_rate_schedule(
        learning_rate=train_cfg.learning_rate, min_lr=train_cfg.min_lr,
        warmup_steps=train_cfg.warmup_steps, steps=train_cfg.steps,
    )
    # Decay matrices (ndim >= 2, embeddings included), not biases or LayerNorm scales: nanoGPT's rule.
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip) if train_cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=train_cfg.beta1, b2=train_cfg.beta2, weight_decay=train_cfg.weight_decay,
                    mask=decay_mask),
    )
    return tx, schedule
