"""A run in its workdir: checked against the command, restored from its newest good checkpoint, and what it
logged before that step recovered."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax

from grassjax.runlog import rewind_metrics
from grassjax.train.checkpoint import Checkpointer
from grassjax.train.setup import TrainingSetup
from grassjax.train.step import TrainState
from grassjax.train.workdir import check_resume


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

    @property
    def config(self):
        return self.setup.config

    def kept_message(self) -> str:
        kept = self.checkpointer.latest_step()
        if kept is None:
            return "no checkpoint had been saved yet"
        return f"last good checkpoint kept at step {kept} in {self.checkpointer.directory}"

    def check_finite(self, metrics, step: int) -> float:
        """The step's loss as a float (it waits for the step); NonFiniteLossError if it is NaN or inf."""
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss}) at step {step}; {self.kept_message()}. Lower "
                f"--config.train.learning_rate or raise --config.train.warmup_steps and rerun.")
        return loss


def open_run(config, workdir: pathlib.Path, data_dir: str | None, print_fn) -> Run:
    """Build the setup, check the workdir's run against it, and restore it."""
    setup = TrainingSetup.build(config, data_dir)
    config, is_main = setup.config, jax.process_index() == 0
    if is_main:
        (workdir / "vocab.json").write_text(json.dumps(setup.dataset.vocab.to_dict()))
    checkpointer = Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints)
    has_checkpoint = checkpointer.latest_step() is not None
    # Refuse a workdir written by another config before touching its checkpoints.
    check_resume(workdir, config.to_dict(), has_checkpoint=has_checkpoint, write=is_main,
                 print_fn=print_fn)
    state = setup.state
    if has_checkpoint:
        state = checkpointer.restore_newest_good(state, print_fn)
        print_fn(f"Resuming from step {int(state.step)} in {checkpointer.directory}")
    # Forget what a crashed run logged past its last checkpoint; recover the evals and the clock before it.
    records = rewind_metrics(workdir / "metrics.jsonl", int(state.step))
    elapsed = max((r["perf/elapsed_s"] for r in records if "perf/elapsed_s" in r), default=0.0)
    return Run(setup, workdir, checkpointer, state, [r for r in records if "val/loss" in r], elapsed)


def finished_result(workdir: pathlib.Path, step: int) -> dict | None:
    """result.json of a run that finished at `step` (its timing, memory, FLOPs and sample), else None."""
    path = workdir / "result.json"
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    needed = {"compile_time_s", "step_memory_bytes", "step_flops", "step_time_ms", "wall_time_s", "sample"}
    return result if result.get("final_step") == step and needed <= result.keys() else None
