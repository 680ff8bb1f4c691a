"""How long each arm of a comparison trains, under compare.match: params (each arm's own
train.steps), tokens (the same number of training tokens) or time (the same seconds of training
time, the step count fixed by a timed warm-up and recorded in <workdir>/<arm>/steps.json).
plan_steps says how each is computed.
"""

from __future__ import annotations

import datetime
import json
import math
import pathlib
import time
from typing import Callable

import jax
import ml_collections
import numpy as np

from grassjax.data.files import write_atomically
from grassjax.train.setup import TrainingSetup
from grassjax.train.parallel import batch_layout

RECORD_NAME = "steps.json"
PROBE_REPEATS = 3


class StepRecordError(ValueError):
    """An arm's recorded step count was fixed for another budget or another arm config."""


def tokens_per_step(cfg) -> int:
    return batch_layout(cfg.train).global_batch * cfg.data.block_size


def time_train_step(cfg, data_dir: str | None, *, steps: int, repeats: int = PROBE_REPEATS,
                    warmup: int = 2) -> dict:
    """Seconds per step of `cfg`'s train step on this machine: the median over `repeats` timed runs
    of `steps` steps, each fed its batch as the training loop feeds it and synchronised once at the
    end, as the loop does at each log; compilation and `warmup` untimed steps come first."""
    trainer = TrainingSetup.build(cfg, data_dir)
    t0 = time.perf_counter()
    step_fn = trainer.train_step.lower(trainer.state, *trainer.batch_at(0),
                                       trainer.hparams).compile()
    compile_s = time.perf_counter() - t0
    state, i = trainer.state, 0
    for _ in range(warmup):
        state, metrics = step_fn(state, *trainer.batch_at(i), trainer.hparams)
        i += 1
    jax.block_until_ready(metrics)
    per_step = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step_fn(state, *trainer.batch_at(i), trainer.hparams)
            i += 1
        float(metrics["loss"])  # blocks, like the loop's check at each log
        per_step.append((time.perf_counter() - t0) / steps)
    return {"s_per_step": float(np.median(per_step)), "runs_s_per_step": per_step,
            "timed_steps": steps * repeats, "compile_s": compile_s}


def _identity(config, cfg) -> dict:
    """What a recorded time-matched step count depends on: the budget and everything that sets the
    step time."""
    layout = batch_layout(cfg.train)
    identity = {"time_budget_s": float(config.compare.time_budget_s), "model": cfg.model.to_dict(),
                "block_size": cfg.data.block_size, "dataset": cfg.data.dataset,
                "global_batch": layout.global_batch, "grad_accum_steps": layout.grad_accum_steps}
    return json.loads(json.dumps(identity))  # tuples as lists, as read back


def _one_from_process_0(value: int) -> int:
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def time_matched(config, cfg, arm_dir: pathlib.Path, data_dir: str | None, print_fn, *,
                 timer: Callable[..., dict] | None = None) -> dict:
    """The record of an arm's time-matched step count: read from arm_dir/steps.json, or timed and
    written there."""
    timer = timer or time_train_step
    path, identity, name = arm_dir / RECORD_NAME, _identity(config, cfg), arm_dir.name
    record = json.loads(path.read_text()) if jax.process_index() == 0 and path.exists() else None
    if record is not None and record["for"] != identity:
        differ = sorted(k for k in identity if record["for"].get(k) != identity[k])
        raise StepRecordError(
            f"{path} fixed arm {name}'s step count ({record['steps']}) for other settings "
            f"({', '.join(differ)} differ); a time-matched comparison keeps its step counts: pass "
            f"another --workdir, or --restart")
    if _one_from_process_0(record is not None):
        steps = _one_from_process_0(record["steps"] if record is not None else 0)
        if record is not None:
            print_fn(f"{name}: {steps} steps for {config.compare.time_budget_s:g}s, recorded in "
                     f"{path} ({1000 * record['s_per_step']:.1f} ms/step measured on "
                     f"{record['device']} at {record['measured_at']}); not re-timed")
        return record or {"match": "time", "steps": steps}
    timing = timer(cfg, data_dir, steps=config.compare.time_probe_steps)
    # floor(budget / s per step), not cut by float error (1.2 / 0.05 = 23.999...)
    steps = _one_from_process_0(max(1, math.floor(config.compare.time_budget_s
                                                  / timing["s_per_step"] + 1e-9)))
    device = jax.devices()[0]
    record = {"match": "time", "steps": steps, **timing, "ms_per_step": 1000 * timing["s_per_step"],
              "device": f"{device.platform}:{device.device_kind} x{jax.device_count()}",
              "measured_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "for": identity}
    if jax.process_index() == 0:
        write_atomically(path, lambda f: f.write(json.dumps(record, indent=1).encode() + b"\n"))
    print_fn(f"{name}: {record['ms_per_step']:.1f} ms/step over {timing['timed_steps']} timed "
             f"steps (compile {timing['compile_s']:.1f}s excluded) -> {steps} steps in "
             f"{config.compare.time_budget_s:g}s; recorded in {path}")
    return record


def plan_steps(config, arm_cfgs: dict[str, ml_collections.ConfigDict], workdir: pathlib.Path,
               data_dir: str | None, print_fn=print, *,
               timer: Callable[..., dict] | None = None) -> dict[str, dict]:
    """{arm: {"match", "steps", "tokens_per_step", ...}}: each arm's step count under compare.match.

    params  every arm runs its own train.steps (the arms are matched in size by design).
    tokens  every arm sees compare.tokens training tokens (0: the shared config's steps x batch x
            block): steps = round(tokens / (batch x block)), so an arm with a longer block or a
            bigger batch runs fewer steps.
    time    every arm trains for compare.time_budget_s seconds of training time, measured the way
            the loop's perf/elapsed_s counts it (running the steps and feeding them their batches;
            not compilation, logging, evaluation or checkpoints: grassjax.train.loop.TrainClock).
            The step count is fixed before the arm trains, so its cosine schedule ends where the
            budget does: `time_train_step` compiles the arm's own train step, runs two untimed
            steps, then times 3 x compare.time_probe_steps steps on the loop's own batches, and
            steps = floor(budget / median s/step).
            The count is written to <workdir>/<arm>/steps.json before the first seed trains; a
            rerun of the comparison (resumed, or with more seeds) reads it back and never re-times,
            so every seed of an arm runs the same schedule. The warm-up compiles the step
            separately from the run's own compile: the run's optimizer bakes in the step count,
            which is not known until the warm-up has timed it.

    Time-matched arms are timed one after the other, all before any trains, so that their step
    times are measured under the same conditions."""
    match = config.compare.get("match", "params")
    budget_tokens = config.compare.get("tokens", 0) or config.train.steps * tokens_per_step(config)
    plans = {}
    for name, cfg in arm_cfgs.items():
        per_step = tokens_per_step(cfg)
        if match == "params":
            plan = {"match": match, "steps": cfg.train.steps}
        elif match == "tokens":
            plan = {"match": match, "steps": max(1, round(budget_tokens / per_step)),
                    "tokens_budget": budget_tokens}
            if plan["steps"] * per_step != budget_tokens:
                print_fn(f"{name}: {budget_tokens:,} tokens is not a whole number of "
                         f"{per_step:,}-token steps; "
                         f"{plan['steps']} steps = {plan['steps'] * per_step:,} tokens")
        else:
            plan = time_matched(config, cfg, workdir / name, data_dir, print_fn, timer=timer)
        plans[name] = {**plan, "tokens_per_step": per_step}
    return plans


def apply_plan(cfg: ml_collections.ConfigDict, plan: dict,
               evals_per_run: int = 0) -> ml_collections.ConfigDict:
    """cfg with the planned step count (and, with evals_per_run > 0, evaluations spread evenly over
    it); a time-matched run also plots its eval losses against training seconds by default in
    W&B."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    if plan["match"] != "params":  # params: train.steps (or train.epochs) as configured
        cfg.train.steps, cfg.train.epochs = int(plan["steps"]), 0.0
    if evals_per_run > 0:
        cfg.train.eval_every = max(1, cfg.train.steps // evals_per_run)
    if plan["match"] == "time":
        cfg.wandb.val_x_axis = "perf/elapsed_s"
    return cfg
