"""The jitted train and eval steps, separate from the loop that drives them.

We use NNX's functional split/merge: the model is split once into a static
graphdef and a pytree of parameters, and the jitted functions take and return
plain pytrees. This keeps NNX's Python graph traversal out of the hot path.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from grassjax.train.optim import TrainHparams, make_optimizer


class TrainState(NamedTuple):
    params: Any  # nnx.State of nnx.Param
    opt_state: Any  # optax state
    step: jax.Array  # int32 scalar: number of updates applied


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats. logits (..., V) float32, targets (...) int."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_train_step(graphdef, *, dropout: float, grad_accum_steps: int = 1,
                    optimizer: Callable[[TrainHparams],
                                        optax.GradientTransformation] = make_optimizer):
    """Returns train_step(state, x, y, hparams) -> (state, metrics), jitted with the state donated.

    `hparams` (`train_hparams(config.train)`) carries the optimizer's numbers and the seed as data,
    so one compiled step serves every learning rate, schedule length and seed of a model and batch
    shape. `optimizer(hparams)` builds the update rule inside the step (AdamW by default; its state
    must come from the same function).
    `dropout` > 0 turns dropout on (the model's rates: model.dropout, model.attn_dropout); its keys
    are fold_in(key(seed), step), so a resumed run draws the same masks.
    With grad_accum_steps = k > 1 the (B, T) batch is split into k microbatches
    (rows i, i+k, i+2k, ... -- so each stays spread over every device of a
    data-parallel mesh) whose gradients are averaged by a lax.scan: one
    optimizer update equal to the full-batch one, at 1/k of the activation memory.
    """
    use_dropout = dropout > 0

    def loss_fn(params, x, y, key):
        model = nnx.merge(graphdef, params)
        rngs = nnx.Rngs(dropout=key) if use_dropout else None
        logits = model(x, deterministic=not use_dropout, rngs=rngs)  # (B, T, V)
        return cross_entropy(logits, y)

    def loss_and_grads(params, x, y, key):
        if grad_accum_steps == 1:
            return jax.value_and_grad(loss_fn)(params, x, y, key)
        k = grad_accum_steps
        # (k, B/k, T)
        split = lambda a: a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1)

        def accumulate(carry, micro):
            loss_sum, grad_sum = carry
            x_i, y_i, i = micro
            loss, grads = jax.value_and_grad(loss_fn)(params, x_i, y_i,
                                                      jax.random.fold_in(key, i))
            return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros(()), zeros),
                                               (split(x), split(y), jnp.arange(k)))
        return loss_sum / k, jax.tree_util.tree_map(lambda g: g / k, grad_sum)

    def train_step(state: TrainState, x, y, hparams: TrainHparams):
        key = jax.random.fold_in(jax.random.key(hparams.seed), state.step)
        loss, grads = loss_and_grads(state.params, x, y, key)
        updates, opt_state = optimizer(hparams).update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "update_norm": optax.tree.norm(updates)}
        return TrainState(params, opt_state, state.step + 1), metrics

    return jax.jit(train_step, donate_argnums=0)


def init_train_state(params, hparams: TrainHparams) -> TrainState:
    """Step 0: `params` and a fresh optimizer state (its structure is what a checkpoint holds)."""
    return TrainState(params, make_optimizer(hparams).init(params), jnp.zeros((), jnp.int32))


def make_eval_step(graphdef):
    """Returns eval_loss(params, xs, ys) -> mean loss over (N, B, T) batches, jitted."""

    def eval_loss(params, xs, ys):
        model = nnx.merge(graphdef, params)
        losses = jax.lax.map(lambda xy: cross_entropy(model(xy[0]), xy[1]), (xs, ys))  # (N,)
        return losses.mean()

    return jax.jit(eval_loss)


def loss_report(loss: float, prefix: str) -> dict[str, float]:
    """Loss in nats, perplexity and bits per character (token) under one prefix."""
    return {f"{prefix}/loss": loss, f"{prefix}/ppl": math.exp(min(loss, 50.0)),
            f"{prefix}/bpc": loss / math.log(2)}
