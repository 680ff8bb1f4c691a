"""Checkpoints of the train state with orbax: save every N steps, keep a few, resume the latest."""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from grassjax.train.step import TrainState


class Checkpointer:
    """Saves TrainState under <workdir>/checkpoints/<step>/ and restores the newest one.

    Saving is synchronous: a Ctrl-C or a NaN stop must find the file complete.
    """

    def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 2):
        self.directory = pathlib.Path(workdir).resolve() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                                 create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState) -> int:
        step = int(jax.device_get(state.step))
        if self.manager.latest_step() != step:
            self.manager.save(step, args=ocp.args.StandardSave(state._asdict()), force=True)
            self.manager.wait_until_finished()
        return step

    def restore(self, template: TrainState, step: int | None = None) -> TrainState:
        """Restore into the structure (and shardings) of `template`."""
        step = self.manager.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template._asdict())
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return TrainState(**restored)

    def close(self):
        self.manager.close()
