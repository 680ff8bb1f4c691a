"""A run in its workdir: checked against the command, restored from its newest good checkpoint,
and what it logged before that step recovered."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax

from grassjax import data
from grassjax.runlog import rewind_metrics
from grassjax.train.checkpoint import CORRUPT_DIR, CheckpointMismatchError, Checkpointer
from grassjax.train.setup import TrainingSetup
from grassjax.train.timeline import PROCESS
from grassjax.train.step import TrainState
from grassjax.train.workdir import WorkdirError, check_data, check_resume, save_run_config


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


@dataclasses.dataclass
class Run:
    """A training setup in its workdir, at the step it starts from."""

    setup: TrainingSetup
    workdir: pathlib.Path
    checkpointer: Checkpointer
    state: TrainState  # restored from the newest good checkpoint, else the setup's step 0
    history: list[dict]  # the evaluations logged before state.step (a resumed run)
    elapsed_s: float  # training seconds before state.step (perf/elapsed_s of a resumed run)
    # the val loss of checkpoints-best/, the bar for the next best
    best_val_loss: float = math.inf

    @property
    def config(self):
        return self.setup.config

    def kept_message(self) -> str:
        kept = self.checkpointer.latest_step()
        if kept is None:
            return "no checkpoint had been saved yet"
        return f"last good checkpoint kept at step {kept} in {self.checkpointer.directory}"

    def check_finite(self, metrics, step: int) -> float:
        """The step's loss as a float (it waits for the step); NonFiniteLossError if it is NaN or
        inf."""
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss}) at step {step}; {self.kept_message()}. Lower "
                f"--config.train.learning_rate or raise --config.train.warmup_steps and rerun.")
        return loss


def open_run(config, workdir: pathlib.Path, data_dir: str | None, print_fn) -> Run:
    """Build the setup, check the workdir's run against it and restore it; only then write into it.

    A refusal (another config, another text, a model of another shape) leaves every file as it was.
    """
    PROCESS.mark("setup_start")
    setup = TrainingSetup.build(config, data_dir)
    PROCESS.mark("setup_end")
    config, is_main = setup.config, jax.process_index() == 0
    checkpointer = Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints,
                                asynchronous=True)
    has_checkpoint = checkpointer.latest_step() is not None
    vocab, fingerprint = setup.dataset.vocab.to_dict(), data.fingerprint(setup.dataset)
    check_resume(workdir, config.to_dict(), has_checkpoint=has_checkpoint, print_fn=print_fn)
    state, best_loss = setup.state, math.inf
    if has_checkpoint:
        check_data(workdir, vocab, fingerprint)
        try:
            state = checkpointer.restore_newest_good(state, print_fn)
        except CheckpointMismatchError as err:
            raise WorkdirError(f"{err}: it was trained with another config; rerun with the "
                               f"settings it was trained with, pass another --workdir, or "
                               f"--restart to move the old run aside and start over") from None
        print_fn(f"Resuming from step {int(state.step)} in {checkpointer.directory}")
    # The run is this command's now.
    step = int(state.step)
    checkpointer.remove_temporary()  # a half-written checkpoint of an aborted save
    checkpointer.drop_best_after(step)
    if checkpointer.best_step() is not None:
        try:
            best_loss = checkpointer.best_val_loss()
        except WorkdirError as err:
            print_fn(f"Warning: {err}; moved to {workdir / CORRUPT_DIR}, the next improvement "
                     f"saves a new one")
            checkpointer.move_best_aside()
    if is_main:
        save_run_config(workdir, config.to_dict(), vocab, fingerprint)
    # Forget what a crashed run logged past its last checkpoint; recover the evals and the clock
    # before it.
    records = rewind_metrics(workdir / "metrics.jsonl", step)
    elapsed = max((r["perf/elapsed_s"] for r in records if "perf/elapsed_s" in r), default=0.0)
    return Run(setup, workdir, checkpointer, state, [r for r in records if "val/loss" in r],
               elapsed, best_loss)


def finished_result(workdir: pathlib.Path, step: int) -> dict | None:
    """result.json of a run that finished at `step` (its timing, memory, FLOPs and sample), else
    None."""
    path = workdir / "result.json"
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    needed = {"compile_time_s", "step_memory_bytes", "step_flops", "step_time_ms", "wall_time_s",
              "sample"}
    return result if result.get("final_step") == step and needed <= result.keys() else None
