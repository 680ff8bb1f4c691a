"""Checkpoints of the train state with orbax: save every N steps, keep a few, resume the newest good one."""

from __future__ import annotations

import contextlib
import datetime
import pathlib
from typing import Callable

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from grassjax.train.step import TrainState
from grassjax.train.workdir import WorkdirError, describe_os_error


@contextlib.contextmanager
def _quiet_absl():
    """Orbax logs an ERROR line (via absl) for each unreadable metadata file; our warning line replaces it."""
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.FATAL)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind an exception (orbax may wrap it), or None."""
    while err is not None:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


class Checkpointer:
    """Saves TrainState under <workdir>/checkpoints/<step>/ and restores the newest one that reads back.

    Saving is synchronous: a Ctrl-C, SIGTERM or NaN stop must find the file complete. Orbax writes each
    checkpoint into a temporary folder and renames it when complete, so a killed save leaves no step folder
    (the temporary one is removed at the next start).
    """

    def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 2):
        self.workdir = pathlib.Path(workdir).resolve()
        self.directory = self.workdir / "checkpoints"
        self.max_to_keep = max_to_keep
        self.manager = self._manager()

    def _manager(self) -> ocp.CheckpointManager:
        with _quiet_absl():  # it reads every step's metadata, which may be the corrupt one
            return ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, enable_async_checkpointing=False,
                                                     create=True),
            )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState) -> int:
        step = int(jax.device_get(state.step))
        if self.manager.latest_step() != step:
            try:
                self.manager.save(step, args=ocp.args.StandardSave(state._asdict()), force=True)
                self.manager.wait_until_finished()
            except Exception as err:  # noqa: BLE001 - a full or read-only disk; orbax may wrap the OSError
                os_err = _os_error(err)
                if os_err is None:
                    raise
                raise WorkdirError(f"cannot write the checkpoint of step {step} ({describe_os_error(os_err)}); "
                                   f"the run stopped, the last good checkpoint is step {self.manager.latest_step()} "
                                   f"in {self.directory}; free space and rerun to resume", exit_code=1) from None
        return step

    def restore(self, template: TrainState, step: int | None = None) -> TrainState:
        """Restore into the structure (and shardings) of `template`."""
        step = self.manager.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template._asdict())
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return TrainState(**restored)

    def restore_newest_good(self, template: TrainState, print_fn: Callable[[str], None] = print) -> TrainState:
        """The newest checkpoint that restores. Ones that do not (a truncated file, a bad disk) are moved to
        <workdir>/checkpoints-corrupt/ with a warning line; if none restores, WorkdirError (nothing moved)."""
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                with _quiet_absl():
                    state = self.restore(template, step)
            except Exception as err:  # noqa: BLE001 - orbax raises JSONDecodeError, ValueError, ... for bad files
                failures.append((step, f"{type(err).__name__}: {err}".splitlines()[0][:200]))
                continue
            if failures:
                self._move_aside([s for s, _ in failures])
                for bad, reason in failures:
                    print_fn(f"Warning: checkpoint {bad} is unreadable ({reason}); moved to "
                             f"{self.workdir / 'checkpoints-corrupt'}, resuming from step {step}")
            return state
        bad, reason = failures[0]
        raise WorkdirError(f"no checkpoint in {self.directory} can be restored (newest, step {bad}: {reason}); "
                           f"pass another --workdir, or --restart to move the old run aside and start over")

    def _move_aside(self, steps: list[int]) -> None:
        target = self.workdir / "checkpoints-corrupt"
        if jax.process_index() == 0:
            target.mkdir(exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        for step in steps:
            if jax.process_index() == 0:  # the one writer; the others only re-read the folder
                (self.directory / str(step)).rename(target / f"{step}-{stamp}")
        self.manager.close()
        self.manager = self._manager()  # it caches the list of steps

    def close(self):
        self.manager.close()
