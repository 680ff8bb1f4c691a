"""The one training loop: every model and every experiment goes through `train`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import signal
import tempfile
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from grassjax import data
from grassjax.compiled import compiled_flops, compiled_memory_bytes
from grassjax.nn import ModelConfig, build_model, param_counts
from grassjax.train.checkpoint import Checkpointer
from grassjax.train.evaluator import Evaluator
from grassjax.train.optim import TrainHparams, hparams_schedule, train_hparams
from grassjax.train.parallel import batch_layout, make_mesh, replicate, shard_global_batch
from grassjax.runlog import RunLogger, rewind_metrics
from grassjax.train.step import TrainState, init_train_state, make_train_step
from grassjax.train.workdir import WorkdirError, WorkdirLock, check_resume, describe_os_error, prepare_workdir


class StopRequested(KeyboardInterrupt):
    """The run stopped on request (SIGINT or SIGTERM) after saving; exit_code is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class StopRequest:
    """Turns the first SIGINT (Ctrl-C) or SIGTERM (Slurm, Kubernetes, preemption) into a request to stop
    after the current step and save.

    The step and any checkpoint being written are allowed to finish, so the
    saved state is consistent. A second signal interrupts at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, print_fn):
        self.requested = False
        self.signum = signal.SIGINT
        self.print_fn = print_fn
        self.previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.print_fn(f"{name}: stopping after this step and saving a checkpoint (send it again to abort at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
    workdir: str
    final_step: int
    best_val_loss: float
    final_val_loss: float
    wall_time_s: float
    compile_time_s: float  # before training: the train step, with the evaluation programs compiling beside it
    step_time_ms: float
    tokens_per_s: float
    step_memory_bytes: int | None  # XLA's estimate for one train step: arguments + outputs + temporaries
    step_flops: float | None  # XLA's cost analysis of one train step (None where the backend gives none)
    params: dict[str, int]
    sample: str
    history: list[dict[str, float]]  # one dict per eval
    train_time_s: float = math.nan  # perf/elapsed_s at the end: see TrainClock
    tokens_per_step: int = 0  # global batch x block


def model_config_from(config, vocab_size: int) -> ModelConfig:
    """The ModelConfig for an experiment config: vocab from the data, block size from data.block_size."""
    values = dict(config.model)
    values.update(vocab_size=vocab_size, block_size=config.data.block_size)
    return ModelConfig.from_mapping(values)


def _wandb_identity(config, exp_name: str) -> dict[str, Any]:
    seed = config.train.seed
    architecture = "bigram" if config.model.kind == "bigram" else config.model.mixer
    tags = list(config.wandb.tags) + [architecture, config.data.dataset]
    return dict(project=config.wandb.project, name=config.wandb.name or f"{exp_name}-s{seed}",
                group=config.wandb.group or exp_name, tags=sorted(set(tags)))


def train(config, *, workdir: str | pathlib.Path, exp_name: str = "run", data_dir: str | None = None,
          wandb_mode: str | None = None, print_fn: Callable[[str], None] = print,
          on_eval: Callable[[int, dict[str, float]], bool] | None = None) -> TrainResult:
    """Train `config` (an experiment ConfigDict) in `workdir`, resuming from its latest checkpoint.

    on_eval(step, metrics), if given, runs after every evaluation; returning True stops training there
    (checkpoint saved, W&B run finished normally, result.final_step < steps). Hyperparameter search uses
    it to report intermediate losses and prune.

    The workdir is checked writable and locked for the whole run (process 0), and SIGINT/SIGTERM
    are turned into "save and stop" (StopRequested) from the start.
    """
    workdir = pathlib.Path(workdir)
    is_main = jax.process_index() == 0  # only process 0 logs to W&B, prints and writes the workdir
    if is_main:
        prepare_workdir(workdir)
    else:
        print_fn(f"process {jax.process_index()} of {jax.process_count()}: training in step with process 0, "
                 f"which prints and writes {workdir}")
        print_fn = lambda *_: None  # noqa: E731
    with contextlib.ExitStack() as stack:
        stack.enter_context(WorkdirLock(workdir) if is_main else contextlib.nullcontext())
        stop = stack.enter_context(StopRequest(print_fn))
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="grassjax-")) if not is_main else None
        try:
            run = _Run.prepare(config, workdir, data_dir, print_fn)
            return _loop(run, exp_name=exp_name, wandb_mode=wandb_mode, print_fn=print_fn, stop=stop,
                         log_dir=workdir if scratch is None else pathlib.Path(scratch), on_eval=on_eval)
        except OSError as err:  # a write before the loop (vocab.json, run_config.json, the logs) on a full disk
            raise WorkdirError(f"cannot write in {workdir} ({describe_os_error(err)}); free space or pass another "
                               f"--workdir", exit_code=1) from None


@dataclasses.dataclass
class Trainer:
    """A run's training setup in memory: data, model, initial optimizer state, the jitted train step and the
    batches. No workdir: `train` adds checkpoints and logs; a time-matched comparison times its steps with it."""

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
    def build(cls, config, data_dir: str | None) -> "Trainer":
        tc = config.train
        mesh = make_mesh()
        layout = batch_layout(tc)  # fails early, naming the keys, if the batch does not split over the devices
        dataset = data.load_dataset(config.data, data_dir)
        if tc.epochs > 0:  # the paper's budgets are in epochs: turn them into optimizer steps
            config = ml_collections.ConfigDict(config.to_dict())
            config.train.steps = math.ceil(tc.epochs * len(dataset.train) / (layout.global_batch * config.data.block_size))
            tc = config.train
        model_cfg = model_config_from(config, dataset.vocab.size)
        model = build_model(model_cfg, seed=tc.seed)
        graphdef, params = nnx.split(model, nnx.Param)
        hparams = train_hparams(tc)
        state = replicate(init_train_state(params, hparams), mesh)
        schedule = hparams_schedule(hparams)
        train_step = make_train_step(graphdef, dropout=model_cfg.dropout, grad_accum_steps=layout.grad_accum_steps)
        return cls(config, dataset, model_cfg, graphdef, param_counts(model), state, replicate(hparams, mesh),
                   schedule, train_step, layout, mesh)

    def batch_at(self, step: int):
        """The global batch of `step`, sharded over the mesh: a pure function of (seed, step)."""
        x, y = data.sample_batch(self.dataset.train, batch_size=self.layout.global_batch,
                                 block_size=self.config.data.block_size, seed=self.config.train.seed, step=step)
        return shard_global_batch(x, self.mesh), shard_global_batch(y, self.mesh)


@dataclasses.dataclass
class _Run(Trainer):
    """A Trainer in its workdir: the checkpointer, the state to start from and the evals logged before it."""

    workdir: pathlib.Path = None
    checkpointer: Checkpointer = None
    history: list[dict] = None  # the evals logged before start_step (a resumed run)
    elapsed_s: float = 0.0  # training seconds before start_step (perf/elapsed_s of a resumed run)

    @classmethod
    def prepare(cls, config, workdir: pathlib.Path, data_dir: str | None, print_fn) -> "_Run":
        trainer = Trainer.build(config, data_dir)
        config, is_main = trainer.config, jax.process_index() == 0
        if is_main:
            (workdir / "vocab.json").write_text(json.dumps(trainer.dataset.vocab.to_dict()))
        checkpointer = Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints)
        has_checkpoint = checkpointer.latest_step() is not None
        # Refuse a workdir written by another config before touching its checkpoints.
        check_resume(workdir, config.to_dict(), has_checkpoint=has_checkpoint, write=is_main, print_fn=print_fn)
        state = trainer.state
        if has_checkpoint:
            state = checkpointer.restore_newest_good(state, print_fn)
            print_fn(f"Resuming from step {int(state.step)} in {checkpointer.directory}")
        # Forget what a crashed run logged past its last checkpoint; recover the evals and the clock before it.
        records = rewind_metrics(workdir / "metrics.jsonl", int(state.step))
        elapsed = max((r["perf/elapsed_s"] for r in records if "perf/elapsed_s" in r), default=0.0)
        fields = {f.name: getattr(trainer, f.name) for f in dataclasses.fields(Trainer)}
        return cls(**{**fields, "state": state}, workdir=workdir,
                   checkpointer=checkpointer, history=[r for r in records if "val/loss" in r], elapsed_s=elapsed)

    def kept_message(self) -> str:
        kept = self.checkpointer.latest_step()
        if kept is None:
            return "no checkpoint had been saved yet"
        return f"last good checkpoint kept at step {kept} in {self.checkpointer.directory}"

    def check_finite(self, metrics, step: int) -> float:
        loss = float(metrics["loss"])  # blocks until the step is done
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss}) at step {step}; {self.kept_message()}. Lower "
                f"--config.train.learning_rate or raise --config.train.warmup_steps and rerun."
            )
        return loss


class TrainClock:
    """perf/elapsed_s: seconds spent training -- running the steps and feeding them their batches -- counted on
    from `offset` (a resumed run's clock). Compilation happens before the clock starts; logging, evaluation and
    checkpoints run inside `paused()`."""

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


def _loop(run: _Run, *, exp_name: str, wandb_mode: str | None, print_fn, stop: StopRequest, log_dir: pathlib.Path,
          on_eval) -> TrainResult:
    config, tc, state, history = run.config, run.config.train, run.state, run.history
    is_main, start_step = jax.process_index() == 0, int(run.state.step)
    tokens_per_step = run.layout.global_batch * config.data.block_size
    evaluator = Evaluator(config, run.graphdef, run.model_cfg, run.dataset, microbatch=run.layout.microbatch,
                          mesh=run.mesh)
    identity = _wandb_identity(config, exp_name)
    logger = RunLogger(workdir=log_dir, config=config.to_dict(), print_fn=print_fn, job_type="train",
                       mode=wandb_mode if is_main else "disabled",  # other processes: off W&B
                       step_metrics=_step_metrics(config), **identity)
    stop_at = tc.steps if tc.stop_after <= 0 else min(tc.steps, tc.stop_after)
    sample, step_times, step = "", [], start_step
    progress = tqdm(total=stop_at, initial=start_step, desc=identity["name"], dynamic_ncols=True,
                    disable=None if is_main else True)

    def evaluate(state, step) -> str:  # the sample; off the training clock
        with clock.paused():
            t0 = time.perf_counter()
            metrics, text = evaluator.evaluate(state.params, step, logger, {"perf/elapsed_s": clock.elapsed()})
            logger.log({"perf/eval_s": time.perf_counter() - t0}, step=step)  # what evaluating costs the run
        history.append({"step": step, **metrics})
        if is_main:  # progress.write prints even where the bar is disabled
            progress.write(f"step {step:>6} | train {metrics['eval_train/loss']:.4f} | val {metrics['val/loss']:.4f} "
                           f"| val bpc {metrics['val/bpc']:.3f}")
        return text

    _announce(run, logger, identity["name"], print_fn)
    try:
        with logger, progress, contextlib.closing(run.checkpointer) as checkpointer:
            finished = _finished_result(run.workdir, start_step) if start_step >= stop_at else None
            train_step, compile_time, step_memory, step_flops = _compile_programs(run, state, start_step, logger,
                                                                                  finished, evaluator)
            run_start = time.perf_counter()
            clock = TrainClock(run.elapsed_s)  # step times are windows of this clock
            window_elapsed, window_step = clock.elapsed(), start_step
            while step < stop_at and not stop.requested:
                state, metrics = train_step(state, *run.batch_at(step), run.hparams)
                step += 1
                if step % tc.log_every == 0 or step == stop_at:
                    loss = run.check_finite(metrics, step)  # waits for the step: training time
                    elapsed = clock.elapsed()
                    step_times.append((elapsed - window_elapsed) / (step - window_step))
                    with clock.paused():  # logging is not training time (a first W&B call can take a second)
                        logger.log({**_train_metrics(loss, metrics, run.schedule(step - 1), step_times[-1],
                                                     tokens_per_step), "perf/elapsed_s": elapsed}, step=step)
                        progress.set_postfix(loss=f"{loss:.4f}")
                    window_elapsed, window_step = elapsed, step
                progress.update(1)
                if step % tc.eval_every == 0 or step == tc.steps:
                    sample = evaluate(state, step)
                    if on_eval is not None and on_eval(step, history[-1]) and step < stop_at:
                        print_fn(f"stopping at step {step}: requested after evaluation")
                        break
                if step % tc.checkpoint_every == 0 and step < stop_at:
                    run.check_finite(metrics, step)  # never save a diverged state
                    with clock.paused():
                        if step % tc.log_every:  # a resumed run's clock starts from the last logged value
                            logger.log({"perf/elapsed_s": clock.elapsed()}, step=step)
                        checkpointer.save(state)
            train_time = clock.elapsed()
            if stop.requested:
                if step > start_step:
                    run.check_finite(metrics, step)
                    if step % tc.log_every:
                        logger.log({"perf/elapsed_s": train_time}, step=step)
                saved = checkpointer.save(state)
                progress.close()
                print_fn(f"Interrupted: checkpoint saved at step {saved} in {checkpointer.directory}; "
                         f"rerun the same command to resume.")
                raise StopRequested(stop.signum)
            if not history or history[-1]["step"] != step:
                sample = evaluate(state, step)
            elif not sample:  # a rerun of a finished run: its evals were recovered, and so is its sample
                sample = finished["sample"] if finished is not None else evaluator.sample(state.params, step)
            checkpointer.save(state)
            wall = time.perf_counter() - run_start
            best_val = min((h["val/loss"] for h in history), default=math.inf)
            # Median over logging windows: robust to the odd slow window (GC, another process).
            step_time = float(np.median(step_times)) if step_times else math.nan
            if finished is not None:
                step_time, wall = finished["step_time_ms"] / 1000, finished["wall_time_s"]
            result = TrainResult(
                workdir=str(run.workdir), final_step=step, best_val_loss=best_val,
                final_val_loss=history[-1]["val/loss"] if history else math.nan, wall_time_s=wall,
                compile_time_s=compile_time, step_time_ms=1000 * step_time, tokens_per_s=tokens_per_step / step_time,
                step_memory_bytes=step_memory, step_flops=step_flops, params=run.counts, sample=sample,
                history=history, train_time_s=train_time, tokens_per_step=tokens_per_step)
            logger.set_summary({"val/best_loss": best_val, "val/best_bpc": best_val / math.log(2),
                                "perf/median_step_time_ms": result.step_time_ms,
                                "perf/median_tokens_per_s": result.tokens_per_s, "perf/wall_time_s": wall,
                                "perf/train_time_s": result.train_time_s})
    except OSError as err:  # a full or read-only disk mid-run (metrics, images, W&B files)
        raise WorkdirError(f"cannot write in {run.workdir} at step {step} ({describe_os_error(err)}); the run "
                           f"stopped, {run.kept_message()}; free space and rerun to resume", exit_code=1) from None
    if is_main:
        (run.workdir / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
    print_fn(f"done: {step} steps in {wall:.1f}s | best val loss {best_val:.4f} ({best_val / math.log(2):.3f} bpc) "
             f"| {result.step_time_ms:.1f} ms/step, {result.tokens_per_s:,.0f} tok/s, compile {compile_time:.1f}s")
    print_fn("sample:\n" + sample)
    return result


def _compile_programs(run: _Run, state, step: int, logger: RunLogger, finished: dict | None, evaluator: Evaluator):
    """(compiled train step, compile seconds, XLA's memory estimate, FLOPs), compiled ahead of the loop so that
    step times exclude it; the evaluation programs compile beside it on other threads, and the seconds count
    both. A rerun of a finished run trains nothing: it keeps what its training measured and compiles no step."""
    if finished is not None:
        return None, finished["compile_time_s"], finished["step_memory_bytes"], finished["step_flops"]
    t0 = time.perf_counter()
    # One process only: a multi-process run must issue its programs in the same order on every process.
    background = evaluator.compile_in_background(state.params) if jax.process_count() == 1 else None
    try:
        compiled = run.train_step.lower(state, *run.batch_at(step), run.hparams).compile()
    finally:
        if background is not None:
            background.join()  # before the first step donates state.params
    compile_time = time.perf_counter() - t0
    memory, flops = compiled_memory_bytes(compiled), compiled_flops(compiled)
    logger.log({"perf/compile_time_s": compile_time,
                **({} if memory is None else {"perf/step_memory_mb": memory / 2**20})}, step=step)
    return compiled, compile_time, memory, flops


def _finished_result(workdir: pathlib.Path, step: int) -> dict | None:
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


def _step_metrics(config) -> dict[str, str]:
    """W&B x axes: every key against "step"; the eval losses against wandb.val_x_axis when it says otherwise."""
    axis = config.wandb.get("val_x_axis", "step")
    return {} if axis == "step" else {"val/*": axis, "eval_train/*": axis}


def _announce(run: _Run, logger: RunLogger, name: str, print_fn) -> None:
    layout, model_cfg, counts = run.layout, run.model_cfg, run.counts
    logger.set_summary({"params/total": counts["total"], "params/non_embedding": counts["non_embedding"]})
    print_fn(f"{name}: {model_cfg.kind}/{model_cfg.mixer} with {counts['total']:,} parameters "
             f"({counts['non_embedding']:,} non-embedding), {run.config.train.steps} steps of {layout.global_batch}x"
             f"{run.config.data.block_size} tokens ({layout.num_devices} device(s) x {layout.per_device_batch} rows x "
             f"{layout.grad_accum_steps} accumulation step(s))")


def _train_metrics(loss: float, metrics, lr, step_time: float, tokens_per_step: int) -> dict[str, float]:
    return {"train/loss": loss, "train/bpc": loss / math.log(2), "train/grad_norm": float(metrics["grad_norm"]),
            "train/update_norm": float(metrics["update_norm"]), "train/lr": float(lr),
            "perf/step_time_ms": 1000 * step_time, "perf/tokens_per_s": tokens_per_step / step_time}
