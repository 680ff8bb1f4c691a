"""A run's training setup in memory: data, model, optimizer state, the jitted step and its batches.

No workdir here: `grassjax.train.loop.train` adds checkpoints and logs, and a time-matched
comparison (grassjax/studies/) times its steps with a setup alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import ml_collections
from flax import nnx

from grassjax import data
from grassjax.nn import ModelConfig, build_model, param_counts
from grassjax.train.optim import TrainHparams, hparams_schedule, train_hparams
from grassjax.train.parallel import batch_layout, make_mesh, replicate, shard_global_batch
from grassjax.train.step import TrainState, init_train_state, make_train_step
from grassjax.train.workdir import describe_os_error


def model_config_from(config, vocab_size: int) -> ModelConfig:
    """The ModelConfig of an experiment config: vocab from the data, block size from
    data.block_size."""
    values = dict(config.model)
    values.update(vocab_size=vocab_size, block_size=config.data.block_size)
    return ModelConfig.from_mapping(values)


@dataclasses.dataclass
class TrainingSetup:
    """Everything a run trains with, built from its config (`build`); the state is step 0."""

    # the experiment config; train.steps is resolved from train.epochs where that is set
    config: Any
    dataset: Any
    model_cfg: ModelConfig
    graphdef: Any
    counts: dict[str, int]
    state: TrainState  # freshly initialised, replicated over the mesh
    hparams: TrainHparams  # the train step's last argument, replicated
    schedule: Callable  # the learning rate at a step, for the logs
    train_step: Callable  # jitted, not yet compiled: train_step(state, x, y, hparams)
    layout: Any
    mesh: Any

    @classmethod
    def build(cls, config, data_dir: str | None) -> "TrainingSetup":
        tc = config.train
        mesh = make_mesh()
        layout = batch_layout(tc)  # fails early, naming the keys, if the batch does not split
        try:
            dataset = data.load_dataset(config.data, data_dir)
        except OSError as err:  # an unreadable file: a data problem, not the workdir's
            raise data.DataError(f"the data could not be read or cached "
                                 f"({describe_os_error(err)}); make it readable, or pass "
                                 f"--data_dir=DIR (or GRASSJAX_DATA_DIR) of a readable "
                                 f"copy") from None
        if tc.epochs > 0:  # the paper's budgets are in epochs: turn them into optimizer steps
            config = ml_collections.ConfigDict(config.to_dict())
            tokens_per_step = layout.global_batch * config.data.block_size
            config.train.steps = math.ceil(tc.epochs * len(dataset.train) / tokens_per_step)
            tc = config.train
        model_cfg = model_config_from(config, dataset.vocab.size)
        model = build_model(model_cfg, seed=tc.seed)
        graphdef, params = nnx.split(model, nnx.Param)
        hparams = train_hparams(tc)
        state = replicate(init_train_state(params, hparams), mesh)
        train_step = make_train_step(graphdef,
                                     dropout=max(model_cfg.dropout, model_cfg.attn_dropout),
                                     grad_accum_steps=layout.grad_accum_steps)
        return cls(config, dataset, model_cfg, graphdef, param_counts(model), state,
                   replicate(hparams, mesh), hparams_schedule(hparams), train_step, layout, mesh)

    @property
    def tokens_per_step(self) -> int:
        return self.layout.global_batch * self.config.data.block_size

    def batch_at(self, step: int):
        """The global batch of `step`, sharded over the mesh: a pure function of (seed, step)."""
        x, y = data.sample_batch(self.dataset.train, batch_size=self.layout.global_batch,
                                 block_size=self.config.data.block_size,
                                 seed=self.config.train.seed, step=step)
        return shard_global_batch(x, self.mesh), shard_global_batch(y, self.mesh)
