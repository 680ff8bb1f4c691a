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
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from grassjax import data as data_lib
from grassjax import sampling
from grassjax.nn import ModelConfig, build_model, param_counts
from grassjax.train.checkpoint import Checkpointer
from grassjax.train.optim import make_optimizer
from grassjax.train.parallel import batch_layout, make_mesh, replicate, replicate_host_array, shard_global_batch
from grassjax.train.probe import flatten_scalars, histograms, make_probe, map_figures
from grassjax.train.run_logger import RunLogger, read_metrics_jsonl
from grassjax.train.step import TrainState, loss_report, make_eval_step, make_train_step
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
    compile_time_s: float
    step_time_ms: float
    tokens_per_s: float
    step_memory_bytes: int  # XLA's estimate for one train step: arguments + outputs + temporaries
    step_flops: float  # XLA's cost analysis of one train step (0 if unavailable)
    params: dict[str, int]
    sample: str
    history: list[dict[str, float]]  # one dict per eval


def rewind_metrics(path: pathlib.Path, step: int) -> list[dict]:
    """Drop records logged after `step` from metrics.jsonl (a resumed run re-logs them); return the rest.

    Records of one step are merged, so an eval's loss and statistics come back as one dict.
    """
    if not path.exists():
        return []
    def before(line):
        try:
            return json.loads(line)["step"] <= step
        except json.JSONDecodeError:  # a line half-written by a killed run
            return False

    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if before(line)]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))
    merged: dict[int, dict] = {}
    for record in read_metrics_jsonl(path):
        merged.setdefault(record["step"], {}).update(record)
    return [merged[s] for s in sorted(merged)]


def compiled_memory_bytes(compiled) -> int:
    """Memory one call of a compiled function needs, from XLA's own analysis (0 if unavailable)."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # some backends do not implement it
        return 0


def compiled_flops(compiled) -> float:
    """FLOPs of one call of a compiled function, from XLA's cost analysis (0 if unavailable)."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0))
    except Exception:
        return 0.0


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
            return _train(config, workdir=workdir, exp_name=exp_name, data_dir=data_dir, wandb_mode=wandb_mode,
                          print_fn=print_fn, stop=stop, scratch=scratch, on_eval=on_eval)
        except OSError as err:  # a write before the loop (vocab.json, run_config.json, the logs) on a full disk
            raise WorkdirError(f"cannot write in {workdir} ({describe_os_error(err)}); free space or pass another "
                               f"--workdir", exit_code=1) from None


def _train(config, *, workdir: pathlib.Path, exp_name: str, data_dir: str | None, wandb_mode: str | None,
           print_fn: Callable[[str], None], stop: StopRequest, scratch: str | None,
           on_eval: Callable[[int, dict[str, float]], bool] | None = None) -> TrainResult:
    tc = config.train
    mesh = make_mesh()
    layout = batch_layout(tc)  # fails early, naming the keys, if the batch does not split over the devices
    is_main = jax.process_index() == 0
    dataset = data_lib.load_dataset(config.data, data_dir)
    if tc.epochs > 0:  # the paper's budgets are in epochs: turn them into optimizer steps
        config = ml_collections.ConfigDict(config.to_dict())
        config.train.steps = math.ceil(tc.epochs * len(dataset.train) / (layout.global_batch * config.data.block_size))
        tc = config.train
    model_cfg = model_config_from(config, dataset.vocab.size)
    if is_main:
        (workdir / "vocab.json").write_text(json.dumps(dataset.vocab.to_dict()))
    model = build_model(model_cfg, seed=tc.seed)
    counts = param_counts(model)
    graphdef, params = nnx.split(model, nnx.Param)
    tx, schedule = make_optimizer(tc)
    state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))

    checkpointer = Checkpointer(workdir, max_to_keep=tc.keep_checkpoints)
    start_step = checkpointer.latest_step()
    # Refuse a workdir written by another config before touching its checkpoints.
    check_resume(workdir, config.to_dict(), has_checkpoint=start_step is not None, write=is_main, print_fn=print_fn)
    state = replicate(state, mesh)
    if start_step is not None:
        state = checkpointer.restore_newest_good(state, print_fn)
        print_fn(f"Resuming from step {int(state.step)} in {checkpointer.directory}")
    start_step = int(state.step)
    # Forget what a crashed run logged past its last checkpoint; recover the evals before it.
    history = [r for r in rewind_metrics(workdir / "metrics.jsonl", start_step) if "val/loss" in r]

    train_step = make_train_step(graphdef, tx, dropout=model_cfg.dropout, seed=tc.seed,
                                 grad_accum_steps=layout.grad_accum_steps)
    eval_loss = make_eval_step(graphdef)
    block, batch = config.data.block_size, layout.global_batch
    eval_sets = {split: data_lib.eval_batches(tokens, batch_size=layout.microbatch, block_size=block,
                                              num_batches=tc.eval_batches, seed=tc.seed)
                 for split, tokens in (("train", dataset.train), ("val", dataset.val))}
    eval_arrays = {split: tuple(replicate_host_array(a, mesh) for a in xy) for split, xy in eval_sets.items()}
    prompt_ids = dataset.vocab.encode(tc.sample_prompt)
    if len(prompt_ids) == 0:  # e.g. "\n" under WordPiece: start from the first validation token instead
        prompt_ids = dataset.val[:1]
    prompt = jnp.asarray(prompt_ids, jnp.int32)[None]
    sc = config.stats
    probe = make_probe(graphdef, model_cfg, hist_bins=sc.hist_bins) if sc.enabled and model_cfg.kind == "lm" else None
    probe_tokens = replicate_host_array(eval_sets["val"][0][0][: sc.probe_batch], mesh)  # fixed validation text

    def batch_at(step):
        x, y = data_lib.sample_batch(dataset.train, batch_size=batch, block_size=block, seed=tc.seed, step=step)
        return shard_global_batch(x, mesh), shard_global_batch(y, mesh)

    def evaluate(state, step) -> dict[str, float]:
        metrics = {}
        for split, (xs, ys) in eval_arrays.items():
            metrics.update(loss_report(float(eval_loss(state.params, xs, ys)), split if split == "val" else "eval_train"))
        return metrics

    def log_statistics(state, step) -> dict[str, float]:
        scalars, maps = probe(state.params, probe_tokens)
        flat = flatten_scalars(scalars, model_cfg)
        logger.log(flat, step=step)
        logger.log_histograms({k: (v, sc.hist_bins) for k, v in histograms(scalars).items()}, step=step)
        if sc.images:
            figures = map_figures(maps, model_cfg, layers=tuple(sc.image_layers))
            logger.log_images(figures, step=step)
            import matplotlib.pyplot as plt
            for fig in figures.values():
                plt.close(fig)
        return flat

    def sample_text(state, step) -> str:
        key = jax.random.fold_in(jax.random.key(tc.seed + 1), step)
        tokens = sampling.generate(nnx.merge(graphdef, state.params), prompt, key, max_new_tokens=tc.sample_tokens,
                                   temperature=tc.temperature, top_k=tc.top_k or None)
        return dataset.vocab.decode(np.asarray(tokens[0]))

    identity = _wandb_identity(config, exp_name)
    workdir_log = workdir
    if not is_main:  # other processes stay off W&B, the console and the workdir: their logs go to a temp dir
        workdir_log, wandb_mode = pathlib.Path(scratch), "disabled"
    logger = RunLogger(workdir=workdir_log, config=config.to_dict(), mode=wandb_mode, job_type="train",
                       print_fn=print_fn, **identity)
    logger.set_summary({"params/total": counts["total"], "params/non_embedding": counts["non_embedding"]})
    print_fn(f"{identity['name']}: {model_cfg.kind}/{model_cfg.mixer} with {counts['total']:,} parameters "
             f"({counts['non_embedding']:,} non-embedding), {tc.steps} steps of {batch}x{block} tokens "
             f"({layout.num_devices} device(s) x {layout.per_device_batch} rows x {layout.grad_accum_steps} "
             f"accumulation step(s))")

    # Compile ahead of the loop so that step times exclude compilation.
    t0 = time.perf_counter()
    x0, y0 = batch_at(start_step)
    train_step = train_step.lower(state, x0, y0).compile()
    compile_time = time.perf_counter() - t0
    peak_memory = compiled_memory_bytes(train_step)
    step_flops = compiled_flops(train_step)
    logger.log({"perf/compile_time_s": compile_time, "perf/step_memory_mb": peak_memory / 2**20}, step=start_step)

    stop_at = tc.steps if tc.stop_after <= 0 else min(tc.steps, tc.stop_after)
    best_val = min((h["val/loss"] for h in history), default=math.inf)
    last_val, sample = (history[-1]["val/loss"] if history else math.nan), ""
    step_times: list[float] = []
    run_start = time.perf_counter()
    window_start, window_steps = time.perf_counter(), 0
    step = start_step
    progress = tqdm(total=stop_at, initial=start_step, desc=identity["name"], dynamic_ncols=True,
                    disable=None if is_main else True)

    def end_of_interval_eval(state, step):
        nonlocal best_val, last_val, sample
        metrics = evaluate(state, step)
        best_val = min(best_val, metrics["val/loss"])
        last_val = metrics["val/loss"]
        sample = sample_text(state, step)
        logger.log(metrics, step=step)
        if probe is not None:
            metrics.update(log_statistics(state, step))
        logger.log_table("samples", ["step", "text"], [[step, sample]], step=step)
        history.append({"step": step, **metrics})
        if is_main:  # progress.write prints even where the bar is disabled
            progress.write(f"step {step:>6} | train {metrics['eval_train/loss']:.4f} | val {metrics['val/loss']:.4f} "
                           f"| val bpc {metrics['val/bpc']:.3f}")

    def kept_message() -> str:
        kept = checkpointer.latest_step()
        if kept is None:
            return "no checkpoint had been saved yet"
        return f"last good checkpoint kept at step {kept} in {checkpointer.directory}"

    def check_finite(metrics, step) -> float:
        loss = float(metrics["loss"])  # blocks until the step is done
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss}) at step {step}; {kept_message()}. Lower "
                f"--config.train.learning_rate or raise --config.train.warmup_steps and rerun."
            )
        return loss

    try:
        while step < stop_at and not stop.requested:
            x, y = batch_at(step)
            state, metrics = train_step(state, x, y)
            step += 1
            window_steps += 1
            if step % tc.log_every == 0 or step == stop_at:
                loss = check_finite(metrics, step)
                step_time = (time.perf_counter() - window_start) / window_steps
                step_times.append(step_time)
                logger.log({"train/loss": loss, "train/bpc": loss / math.log(2),
                            "train/grad_norm": float(metrics["grad_norm"]),
                            "train/update_norm": float(metrics["update_norm"]),
                            "train/lr": float(schedule(step - 1)),
                            "perf/step_time_ms": 1000 * step_time,
                            "perf/tokens_per_s": batch * block / step_time}, step=step)
                progress.set_postfix(loss=f"{loss:.4f}")
                window_start, window_steps = time.perf_counter(), 0
            progress.update(1)
            if step % tc.eval_every == 0 or step == tc.steps:
                end_of_interval_eval(state, step)
                window_start, window_steps = time.perf_counter(), 0  # eval time is not step time
                if on_eval is not None and on_eval(step, history[-1]) and step < stop_at:
                    print_fn(f"stopping at step {step}: requested after evaluation")
                    break
            if step % tc.checkpoint_every == 0 and step < stop_at:
                check_finite(metrics, step)  # never save a diverged state
                checkpointer.save(state)
        if stop.requested:
            if step > start_step:
                check_finite(metrics, step)
            saved = checkpointer.save(state)
            progress.close()
            print_fn(f"Interrupted: checkpoint saved at step {saved} in {checkpointer.directory}; "
                     f"rerun the same command to resume.")
            raise StopRequested(stop.signum)
        if not history or history[-1]["step"] != step:
            end_of_interval_eval(state, step)
        elif not sample:  # a rerun of a finished run: its evals were recovered, draw the sample again
            sample = sample_text(state, step)
        checkpointer.save(state)
    except KeyboardInterrupt as err:
        progress.close()
        logger.finish(exit_code=getattr(err, "exit_code", 130))
        checkpointer.close()
        raise
    except OSError as err:  # a full or read-only disk mid-run (metrics, images, W&B files)
        progress.close()
        with contextlib.suppress(Exception):
            logger.finish(exit_code=1)
            checkpointer.close()
        raise WorkdirError(f"cannot write in {workdir} at step {step} ({describe_os_error(err)}); the run stopped, "
                           f"{kept_message()}; free space and rerun to resume", exit_code=1) from None
    except (NonFiniteLossError, WorkdirError):
        progress.close()
        logger.finish(exit_code=1)
        checkpointer.close()
        raise
    progress.close()
    checkpointer.close()

    wall = time.perf_counter() - run_start
    # Median over logging windows: robust to the odd slow window (GC, another process).
    step_time = float(np.median(step_times)) if step_times else math.nan
    result = TrainResult(
        workdir=str(workdir), final_step=step, best_val_loss=best_val, final_val_loss=last_val, wall_time_s=wall,
        compile_time_s=compile_time, step_time_ms=1000 * step_time, tokens_per_s=batch * block / step_time,
        step_memory_bytes=peak_memory, step_flops=step_flops, params=counts, sample=sample, history=history,
    )
    logger.set_summary({"val/best_loss": best_val, "val/best_bpc": best_val / math.log(2),
                        "perf/median_step_time_ms": result.step_time_ms, "perf/median_tokens_per_s": result.tokens_per_s,
                        "perf/wall_time_s": wall})
    logger.finish()
    if is_main:
        (workdir / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
    print_fn(f"done: {step} steps in {wall:.1f}s | best val loss {best_val:.4f} ({best_val / math.log(2):.3f} bpc) "
             f"| {result.step_time_ms:.1f} ms/step, {result.tokens_per_s:,.0f} tok/s, compile {compile_time:.1f}s")
    print_fn("sample:\n" + sample)
    return result
