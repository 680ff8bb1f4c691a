"""The one training loop: every model and every experiment goes through `train`.

train        the workdir, its lock and the stop signals, then one RunLoop
RunLoop      compile, then `_train_steps` (step, log, evaluate, checkpoint), then the end of the
             invocation: `_stop_and_save` on a signal, else `_finish` (final evaluation, summary)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from grassjax.compiled import compiled_flops, compiled_memory_bytes
from grassjax.runlog import RunLogger
from grassjax.train.evaluator import BackgroundJobs, Evaluator
from grassjax.train.parallel import lost_peer_exit, peer_lost
from grassjax.train.resume import NonFiniteLossError, Run, finished_result, open_run
from grassjax.train.timeline import PROCESS
from grassjax.train.workdir import WorkdirError, WorkdirLock, describe_os_error, prepare_workdir

__all__ = ["AbortRequested", "NonFiniteLossError", "StopRequested", "TrainResult", "train"]


class StopRequested(KeyboardInterrupt):
    """The run stopped on request (SIGINT or SIGTERM) after saving; exit_code is 128 + the
    signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class AbortRequested(KeyboardInterrupt):
    """A second SIGINT or SIGTERM: stop at once, without saving; exit_code is 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class StopRequest:
    """Turns the first SIGINT (Ctrl-C) or SIGTERM (Slurm, Kubernetes, preemption) into a request to
    stop after the current step and save; a second one aborts at once (AbortRequested).

    The step and any checkpoint being written are allowed to finish, so the saved state is
    consistent. Where the main thread cannot take the second signal (it waits inside a collective of
    a peer that is gone), a watchdog thread, woken by Python's signal wakeup fd, ends the process
    after ABORT_GRACE_S (`on_abort` first: removing half-written checkpoints).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    ABORT_GRACE_S = 5.0

    def __init__(self, print_fn, on_abort: Callable[[], None] | None = None):
        self.requested = False
        self.received = 0
        self.aborting = False
        self.signum = signal.SIGINT
        self.print_fn, self.on_abort = print_fn, on_abort
        self.previous, self._wakeup = {}, None

    def _handle(self, signum, frame):
        # this process's own signals: a stop agreed with another process is not one
        self.received += 1
        if self.received > 1:
            self.aborting = True
            raise AbortRequested(signum)
        if self.requested:  # another process's signal already stops this one: nothing more to say
            return
        self.requested, self.signum = True, signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.print_fn(f"{name}: stopping after this step and saving a checkpoint (send it again to "
                      f"abort at once)")

    def _watch(self, reader: socket.socket) -> None:
        seen = 0
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            seen += sum(1 for b in data if b in self.SIGNALS)
            if seen >= 2:
                time.sleep(self.ABORT_GRACE_S)
                if self.aborting:  # the main thread took it: it is unwinding
                    return
                if self.on_abort is not None:
                    with contextlib.suppress(Exception):
                        self.on_abort()
                signum = data[-1] if data[-1] in self.SIGNALS else signal.SIGTERM
                print(f"launch.py: error: aborted by a second {signal.Signals(signum).name} while "
                      f"waiting on another process; nothing was saved", file=sys.__stderr__,
                      flush=True)
                os._exit(128 + signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            self._wakeup = (reader, writer, signal.set_wakeup_fd(writer.fileno(),
                                                                 warn_on_full_buffer=False))
            threading.Thread(target=self._watch, args=(reader,), name="grassjax-abort",
                             daemon=True).start()
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self._wakeup is not None:
            reader, writer, previous_fd = self._wakeup
            signal.set_wakeup_fd(previous_fd)
            writer.close()
            reader.close()
        return False


@dataclasses.dataclass
class TrainResult:
    workdir: str
    final_step: int
    best_val_loss: float
    final_val_loss: float
    wall_time_s: float
    compile_time_s: float  # the train step, with the evaluation programs compiling beside it
    step_time_ms: float
    tokens_per_s: float
    step_memory_bytes: int | None  # XLA's estimate for one step: arguments + outputs + temporaries
    step_flops: float | None  # XLA's cost analysis of one train step (None where there is none)
    params: dict[str, int]
    sample: str
    history: list[dict[str, float]]  # one dict per eval
    train_time_s: float = math.nan  # perf/elapsed_s at the end: see TrainClock
    tokens_per_step: int = 0  # global batch x block


class TrainClock:
    """perf/elapsed_s: seconds spent training (running the steps and feeding them their batches),
    counted on from `offset` (a resumed run's clock). Compilation happens before the clock starts;
    logging, evaluation and checkpoints run inside `paused()`."""

    def __init__(self, offset: float = 0.0):
        self.offset, self.start = offset, time.perf_counter()

    def elapsed(self) -> float:
        return self.offset + time.perf_counter() - self.start

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - t0


def train(config, *, workdir: str | pathlib.Path, exp_name: str = "run",
          data_dir: str | None = None, wandb_mode: str | None = None,
          print_fn: Callable[[str], None] = print,
          on_eval: Callable[[int, dict[str, float]], bool] | None = None) -> TrainResult:
    """Train `config` (an experiment ConfigDict) in `workdir`, resuming from its latest checkpoint.

    on_eval(step, metrics), if given, runs after every evaluation; returning True stops training
    there (checkpoint saved, W&B run finished normally, result.final_step < steps). Hyperparameter
    search uses it to report intermediate losses and prune.

    The workdir is checked writable and locked for the whole run (process 0), and SIGINT/SIGTERM
    are turned into "save and stop" (StopRequested) from the start.
    """
    workdir = pathlib.Path(workdir)
    is_main = jax.process_index() == 0  # only process 0 logs to W&B, prints and writes the workdir
    if is_main:
        prepare_workdir(workdir)
    else:
        print_fn(f"process {jax.process_index()} of {jax.process_count()}: training in step with "
                 f"process 0, which prints and writes {workdir}")
        print_fn = lambda *_: None  # noqa: E731
    with contextlib.ExitStack() as stack:
        stack.enter_context(WorkdirLock(workdir) if is_main else contextlib.nullcontext())
        stop = stack.enter_context(StopRequest(print_fn))
        log_dir = workdir if is_main else \
            pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="grassjax-")))
        run = loop = None
        try:
            run = open_run(config, workdir, data_dir, print_fn)
            stop.on_abort = run.checkpointer.remove_temporary
            loop = RunLoop(run, exp_name=exp_name, wandb_mode=wandb_mode, print_fn=print_fn,
                           stop=stop, log_dir=log_dir, on_eval=on_eval)
            return loop.execute()
        except OSError as err:  # a write before the loop (vocab.json, run_config.json, the logs)
            raise WorkdirError(f"cannot write in {workdir} ({describe_os_error(err)}); free space "
                               f"or pass another --workdir", exit_code=1) from None
        except BaseException as err:
            _end_abnormally(err, run, loop, stack)
            raise


def _end_abnormally(err: BaseException, run: Run | None, loop: "RunLoop | None", stack) -> None:
    """After an abort, remove half-written checkpoints; after losing a peer process, say so in one
    line and end the process (it returns only for the errors that are raised on as they are)."""
    if run is None:
        return
    if isinstance(err, AbortRequested):
        run.checkpointer.remove_temporary()
    elif isinstance(err, Exception) and peer_lost(err):
        run.checkpointer.remove_temporary()
        stack.close()  # the lock, before the exit that skips the rest
        lost_peer_exit(loop.step if loop is not None else int(run.state.step), run.kept_message(),
                       err)


class RunLoop:
    """One invocation of a run: from the step it was restored at to train.stop_after (or the
    end)."""

    def __init__(self, run: Run, *, exp_name: str, wandb_mode: str | None, print_fn,
                 stop: StopRequest, log_dir: pathlib.Path, on_eval):
        setup, config = run.setup, run.config
        self.run, self.setup, self.tc = run, setup, config.train
        self.print_fn, self.stop, self.on_eval = print_fn, stop, on_eval
        self.is_main = jax.process_index() == 0
        self.state, self.step, self.history = run.state, int(run.state.step), run.history
        self.start_step = self.step
        self.stop_at = (self.tc.steps if self.tc.stop_after <= 0
                        else min(self.tc.steps, self.tc.stop_after))
        self.metrics, self.sample, self.step_times = None, "", []
        self.evaluator = Evaluator(config, setup.graphdef, setup.model_cfg, setup.dataset,
                                   microbatch=setup.layout.microbatch, mesh=setup.mesh)
        self.identity = _wandb_identity(config, exp_name)
        self.timeline = PROCESS
        self.logger: RunLogger | None = None  # started beside the compilation (W&B waits on I/O)
        self._logger_args = dict(workdir=log_dir, config=config.to_dict(), print_fn=print_fn,
                                 job_type="train", mode=wandb_mode if self.is_main else "disabled",
                                 step_metrics=_step_metrics(config), **self.identity)
        self.progress = tqdm(total=self.stop_at, initial=self.step, desc=self.identity["name"],
                             dynamic_ncols=True, disable=None if self.is_main else True)
        self.clock: TrainClock | None = None  # started once the programs are compiled

    def execute(self) -> TrainResult:
        _announce(self.setup, self.identity["name"], self.print_fn)
        starting = BackgroundJobs([lambda: RunLogger(**self._logger_args)])  # W&B, beside compiling
        try:
            with contextlib.ExitStack() as stack:
                stack.callback(_finish_unclaimed, starting, self)
                stack.enter_context(self.progress)
                stack.enter_context(contextlib.closing(self.run.checkpointer))
                finished = finished_result(self.run.workdir, self.step) \
                    if self.step >= self.stop_at else None
                self.timeline.mark("compile_start")
                compiled = _compile_programs(self.setup, self.state, self.step, finished,
                                             self.evaluator)
                self.timeline.mark("compile_end")
                with self.timeline.timed("wandb"):  # what waiting for W&B costs beyond that
                    self.logger = starting.join()[0]
                stack.enter_context(self.logger)
                _log_start(self.setup, self.logger, self.step, compiled)
                run_start = time.perf_counter()
                self.clock = TrainClock(self.run.elapsed_s)  # step times are windows of this clock
                self._train_steps(compiled[0])
                train_time = self.clock.elapsed()
                if self._stop_agreed():
                    self._stop_and_save(train_time)
                result = self._finish(run_start, train_time, compiled, finished)
                self.timeline.mark("shutdown")  # W&B's finish, then the files below
        except OSError as err:  # a full or read-only disk mid-run (metrics, images, W&B files)
            raise WorkdirError(f"cannot write in {self.run.workdir} at step {self.step} "
                               f"({describe_os_error(err)}); the run stopped, "
                               f"{self.run.kept_message()}; free space and rerun to resume",
                               exit_code=1) from None
        if self.is_main:
            (self.run.workdir / "result.json").write_text(json.dumps(dataclasses.asdict(result),
                                                                     indent=2))
        best = result.best_val_loss
        self.print_fn(f"done: {result.final_step} steps in {result.wall_time_s:.1f}s | best val "
                      f"loss {best:.4f} ({best / math.log(2):.3f} bpc) | "
                      f"{result.step_time_ms:.1f} ms/step, {result.tokens_per_s:,.0f} tok/s, "
                      f"compile {result.compile_time_s:.1f}s")
        self.print_fn("sample:\n" + result.sample)
        self.timeline.mark("end")
        if self.is_main:
            self.timeline.write(self.run.workdir / "timeline.json", train_time)
        return result

    def _train_steps(self, train_step) -> None:
        """Step until stop_at, a stop request, or on_eval asks to stop; log, evaluate and checkpoint
        at their cadences."""
        tc, run, setup = self.tc, self.run, self.setup
        window_elapsed, window_step = self.clock.elapsed(), self.step
        while self.step < self.stop_at and not self._stop_agreed():
            self.state, self.metrics = train_step(self.state, *setup.batch_at(self.step),
                                                  setup.hparams)
            self.step += 1
            step = self.step
            if step % tc.log_every == 0 or step == self.stop_at:
                loss = run.check_finite(self.metrics, step)  # waits for the step: training time
                elapsed = self.clock.elapsed()
                self.step_times.append((elapsed - window_elapsed) / (step - window_step))
                # logging is not training time (a first W&B call is slow)
                with self.clock.paused(), self.timeline.timed("logging"):
                    self.logger.log({**_train_metrics(loss, self.metrics, setup.schedule(step - 1),
                                                      self.step_times[-1], setup.tokens_per_step),
                                     "perf/elapsed_s": elapsed}, step=step)
                    self.progress.set_postfix(loss=f"{loss:.4f}")
                window_elapsed, window_step = elapsed, step
            self.progress.update(1)
            if step % tc.eval_every == 0 or step == tc.steps:
                self.sample = self._evaluate()
                if self.on_eval is not None and self.on_eval(step, self.history[-1]) \
                        and step < self.stop_at:
                    self.print_fn(f"stopping at step {step}: requested after evaluation")
                    return
            if step % tc.checkpoint_every == 0 and step < self.stop_at:
                run.check_finite(self.metrics, step)  # never save a diverged state
                with self.clock.paused(), self.timeline.timed("checkpoints"):
                    # a resumed run's clock starts from the last logged value
                    if step % tc.log_every:
                        self.logger.log({"perf/elapsed_s": self.clock.elapsed()}, step=step)
                    run.checkpointer.save(self.state)

    def _stop_agreed(self) -> bool:
        """Whether to stop now. With several processes, one that got the signal stops every one at
        the same step (the signals are reduced over processes), so that all of them save
        together."""
        if jax.process_count() == 1:
            return self.stop.requested
        mine = self.stop.signum if self.stop.requested else 0
        signals = np.asarray(multihost_utils.process_allgather(
            np.asarray(mine, np.int32))).reshape(-1)
        if signals.max() > 0 and not self.stop.requested:  # another process got it: stop as it does
            sender = int(np.argmax(signals > 0))
            self.stop.requested, self.stop.signum = True, int(signals.max())
            self.print_fn(f"process {sender} got {signal.Signals(self.stop.signum).name}: stopping "
                          f"after this step and saving a checkpoint")
        return bool(signals.max() > 0)

    def _evaluate(self) -> str:
        """Losses, sample and statistics at this step, off the training clock; the state is saved as
        the best when its val loss is the lowest so far. Returns the sample."""
        with self.clock.paused():
            t0 = time.perf_counter()
            with self.timeline.timed("evaluations"):
                metrics, text = self.evaluator.evaluate(self.state.params, self.step, self.logger,
                                                        {"perf/elapsed_s": self.clock.elapsed()})
            eval_s = time.perf_counter() - t0
            if (metrics["val/loss"] < self.run.best_val_loss
                    and self.run.checkpointer.saved_best_step() != self.step):
                with self.timeline.timed("checkpoints"):
                    self.run.checkpointer.save_best(self.state, metrics["val/loss"])
                self.run.best_val_loss = metrics["val/loss"]
            with self.timeline.timed("logging"):
                self.logger.log({"perf/eval_s": eval_s}, step=self.step)
        self.history.append({"step": self.step, **metrics})
        if self.is_main:  # progress.write prints even where the bar is disabled
            self.progress.write(f"step {self.step:>6} | train {metrics['eval_train/loss']:.4f} | "
                                f"val {metrics['val/loss']:.4f} | val bpc {metrics['val/bpc']:.3f}")
        return text

    def _stop_and_save(self, train_time: float) -> None:
        """A stop request: save at the current step, say how to resume, raise StopRequested."""
        if self.step > self.start_step:
            self.run.check_finite(self.metrics, self.step)
            if self.step % self.tc.log_every:
                self.logger.log({"perf/elapsed_s": train_time}, step=self.step)
        saved = self.run.checkpointer.save(self.state, wait=True)
        self.progress.close()
        self.print_fn(f"Interrupted: checkpoint saved at step {saved} in "
                      f"{self.run.checkpointer.directory}; rerun the same command to resume.")
        raise StopRequested(self.stop.signum)

    def _finish(self, run_start: float, train_time: float, compiled,
                finished: dict | None) -> TrainResult:
        """The end of training or of this invocation: a last evaluation, the checkpoint, the
        summary."""
        _, compile_time, step_memory, step_flops = compiled
        if not self.history or self.history[-1]["step"] != self.step:
            self.sample = self._evaluate()
        # a rerun of a finished run: its evals were recovered, and so is its sample
        elif not self.sample:
            self.sample = finished["sample"] if finished is not None else \
                self.evaluator.sample(self.state.params, self.step)
        with self.timeline.timed("checkpoints"):
            self.run.checkpointer.save(self.state, wait=True)  # every save on disk before the end
        with self.timeline.timed("logging"):
            self._log_models()
        wall = time.perf_counter() - run_start
        best_val = min((h["val/loss"] for h in self.history), default=math.inf)
        # Median over logging windows: robust to the odd slow window (GC, another process).
        step_time = float(np.median(self.step_times)) if self.step_times else math.nan
        if finished is not None:
            step_time, wall = finished["step_time_ms"] / 1000, finished["wall_time_s"]
        tokens_per_step = self.setup.tokens_per_step
        result = TrainResult(
            workdir=str(self.run.workdir), final_step=self.step, best_val_loss=best_val,
            final_val_loss=self.history[-1]["val/loss"] if self.history else math.nan,
            wall_time_s=wall, compile_time_s=compile_time, step_time_ms=1000 * step_time,
            tokens_per_s=tokens_per_step / step_time, step_memory_bytes=step_memory,
            step_flops=step_flops, params=self.setup.counts, sample=self.sample,
            history=self.history, train_time_s=train_time, tokens_per_step=tokens_per_step)
        self.logger.set_summary({"val/best_loss": best_val, "val/best_bpc": best_val / math.log(2),
                                 "perf/median_step_time_ms": result.step_time_ms,
                                 "perf/median_tokens_per_s": result.tokens_per_s,
                                 "perf/wall_time_s": wall,
                                 "perf/train_time_s": result.train_time_s})
        return result


    def _log_models(self) -> None:
        """The final and the best checkpoint as W&B "model" artifacts, aliases "latest" and "best"
        (one artifact with both where they are one step), each with what loading it needs. The best
        goes first: W&B moves "latest" to the version logged last."""
        checkpointer, workdir = self.run.checkpointer, self.run.workdir
        if self.logger.run is None or not self.setup.config.wandb.get("log_checkpoints", True):
            return
        best, latest = checkpointer.best_step(), checkpointer.latest_step()
        for step, aliases in ((best if best != latest else None, ["best"]),
                              (latest, ["latest"] + (["best"] if best == latest else []))):
            if step is None:
                continue
            folder = (checkpointer.directory if "latest" in aliases
                      else checkpointer.best_directory)
            metadata = {"step": step, "workdir": str(workdir), "exp": self.identity["name"]}
            if "best" in aliases:
                metadata["val_loss"] = self.run.best_val_loss
            self.logger.log_artifact(f"model-{self.logger.run_id}", "model",
                                     {"checkpoint": folder / str(step),
                                      "run_config.json": workdir / "run_config.json",
                                      "vocab.json": workdir / "vocab.json"},
                                     aliases=aliases, metadata=metadata)


def _compile_programs(setup, state, step: int, finished: dict | None, evaluator: Evaluator):
    """(compiled train step, compile seconds, XLA's memory estimate, FLOPs), compiled ahead of the
    loop so that step times exclude it; the evaluation programs compile beside it on other threads,
    and the seconds count both. A rerun of a finished run trains nothing: it keeps what its training
    measured and compiles no step."""
    if finished is not None:
        return (None, finished["compile_time_s"], finished["step_memory_bytes"],
                finished["step_flops"])
    t0 = time.perf_counter()
    # One process only: a multi-process run must issue its programs in the same order everywhere.
    background = evaluator.compile_in_background(state.params) if jax.process_count() == 1 else None
    try:
        compiled = setup.train_step.lower(state, *setup.batch_at(step), setup.hparams).compile()
    finally:
        if background is not None:
            background.join()  # before the first step donates state.params
    compile_time = time.perf_counter() - t0
    return compiled, compile_time, compiled_memory_bytes(compiled), compiled_flops(compiled)


def _finish_unclaimed(starting: "BackgroundJobs", loop: "RunLoop") -> None:
    """A logger whose start the run never waited for (it failed first): finish it too."""
    if loop.logger is None:
        with contextlib.suppress(BaseException):
            logger = starting.join()[0]
            logger.finish(exit_code=1)


def _log_start(setup, logger: RunLogger, step: int, compiled) -> None:
    _, compile_time, memory, _ = compiled
    counts = setup.counts
    logger.set_summary({"params/total": counts["total"],
                        "params/non_embedding": counts["non_embedding"]})
    logger.log({"perf/compile_time_s": compile_time,
                **({} if memory is None else {"perf/step_memory_mb": memory / 2**20})}, step=step)


def _wandb_identity(config, exp_name: str) -> dict[str, Any]:
    seed = config.train.seed
    architecture = "bigram" if config.model.kind == "bigram" else config.model.mixer
    tags = list(config.wandb.tags) + [architecture, config.data.dataset]
    return dict(project=config.wandb.project, name=config.wandb.name or f"{exp_name}-s{seed}",
                group=config.wandb.group or exp_name, tags=sorted(set(tags)))


def _step_metrics(config) -> dict[str, str]:
    """W&B x axes: every key against "step"; the eval losses against wandb.val_x_axis when it says
    otherwise."""
    axis = config.wandb.get("val_x_axis", "step")
    return {} if axis == "step" else {"val/*": axis, "eval_train/*": axis}


def _announce(setup, name: str, print_fn) -> None:
    layout, model_cfg, counts, tc = setup.layout, setup.model_cfg, setup.counts, setup.config.train
    print_fn(f"{name}: {model_cfg.kind}/{model_cfg.mixer} with {counts['total']:,} parameters "
             f"({counts['non_embedding']:,} non-embedding), {tc.steps} steps of "
             f"{layout.global_batch}x{setup.config.data.block_size} tokens "
             f"({layout.num_devices} device(s) x "
             f"{layout.per_device_batch} rows x {layout.grad_accum_steps} accumulation step(s))")


def _train_metrics(loss: float, metrics, lr, step_time: float,
                   tokens_per_step: int) -> dict[str, float]:
    return {"train/loss": loss, "train/bpc": loss / math.log(2),
            "train/grad_norm": float(metrics["grad_norm"]),
            "train/update_norm": float(metrics["update_norm"]), "train/lr": float(lr),
            "perf/step_time_ms": 1000 * step_time, "perf/tokens_per_s": tokens_per_step / step_time}
