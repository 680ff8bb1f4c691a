"""benchmark_end_to_end: a command's wall time from start to exit, as a user sees it, in phases.

Each round runs every command in config.bench.commands (and nanoGPT's train.py with its README's
CPU command, where config.bench.nanogpt_dir names a checkout) as a subprocess, one after the other,
from a fresh HOME, an empty compile cache and a new workdir (so W&B starts offline, from nothing).
Rounds alternate the order. The phases come from <workdir>/timeline.json, which the run writes
(grassjax.train.timeline); the parent times the whole process. Outputs: results.json,
end_to_end.png, a W&B run.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from grassjax.bench import timing
from grassjax.extras import require
from grassjax.runlog import RunLogger
from grassjax.runlog.records import write_json
from grassjax.train.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[2]
# nanoGPT's README, "I only have a macbook":
NANOGPT_CPU = ("config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 "
               "--log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 "
               "--n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0")


def _fresh_env(home: pathlib.Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "JAX_COMPILATION"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), NETRC=str(home / "no-netrc"),
               PYTHONUNBUFFERED="1")
    return env


def run_grassjax(exp: str, bc, data_dir: str | None, scratch: pathlib.Path) -> dict:
    """One start-to-exit run of `launch.py --exp=<exp>`; its wall time, phases and best val loss."""
    home, workdir = scratch / "home", scratch / "run"
    home.mkdir(parents=True)
    args = [sys.executable, str(REPO / "launch.py"), f"--exp={exp}", f"--workdir={workdir}",
            f"--compile_cache={home / '.cache' / 'grassjax' / 'xla'}", *bc.extra_flags]
    if data_dir:
        args.append(f"--data_dir={data_dir}")
    load = os.getloadavg()[0]
    spawned = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=_fresh_env(home),
                          stdin=subprocess.DEVNULL, timeout=bc.timeout_s)
    exited = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"{exp} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    timeline = json.loads((workdir / "timeline.json").read_text())
    phases = {"start-up: interpreter and imports": timeline["marks"]["main"] - spawned,
              **timeline["phases"], "shutdown: process exit": exited - timeline["marks"]["end"]}
    result = json.loads((workdir / "result.json").read_text())
    return dict(command=exp, wall_s=exited - spawned, load_avg_1m=load, phases=phases,
                accounted_s=sum(phases.values()), best_val_loss=result["best_val_loss"],
                steps=result["final_step"], step_time_ms=result["step_time_ms"],
                compile_time_s=result["compile_time_s"])


def check_nanogpt(nanogpt_dir: pathlib.Path) -> None:
    """A checkout of nanoGPT and a PyTorch to run it, or one line naming what is missing."""
    missing = [name for name in ("train.py", "model.py", "configurator.py",
                                 "config/train_shakespeare_char.py",
                                 "data/shakespeare_char/prepare.py")
               if not (nanogpt_dir / name).is_file()]
    if missing:
        raise ConfigError(f"--config.bench.nanogpt_dir={nanogpt_dir} is not a nanoGPT checkout (no "
                          f"{', '.join(missing)}); point it at a clone of karpathy/nanoGPT")
    require("torch", extra="torch", feature="nanoGPT's train.py in benchmark_end_to_end")


def prepare_nanogpt(nanogpt_dir: pathlib.Path, data_dir: str | None) -> None:
    """nanoGPT's shakespeare_char data, from our checked copy of the text, by its prepare.py."""
    folder = nanogpt_dir / "data" / "shakespeare_char"
    if (folder / "train.bin").exists():
        return
    from grassjax.data import load_text

    text = load_text(data_dir)
    (folder / "input.txt").write_text(text)
    subprocess.run([sys.executable, "prepare.py"], cwd=folder, check=True, capture_output=True)


def run_nanogpt(bc, scratch: pathlib.Path) -> dict:
    """One run of nanoGPT's train.py with its README's CPU command."""
    home = scratch / "home"
    home.mkdir(parents=True)
    out_dir = scratch / "out"
    args = [sys.executable, "train.py", *bc.nanogpt_args.split(), f"--out_dir={out_dir}"]
    load = os.getloadavg()[0]
    spawned = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=bc.nanogpt_dir,
                          env=_fresh_env(home), stdin=subprocess.DEVNULL, timeout=bc.timeout_s)
    wall = time.time() - spawned
    if proc.returncode != 0:
        raise RuntimeError(f"nanoGPT's train.py failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-500:]}")
    vals = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", proc.stdout)
    return dict(command="nanoGPT train.py", wall_s=wall, load_avg_1m=load, phases={},
                best_val_loss=min(float(v) for _, v in vals) if vals else float("nan"))


def summarise(rounds: list[list[dict]]) -> dict:
    """Per command: the mean and spread of its wall time and of each phase; the ratio to nanoGPT on
    the means."""
    by_command: dict[str, list[dict]] = {}
    for round_ in rounds:
        for run in round_:
            by_command.setdefault(run["command"], []).append(run)
    summary = {}
    for command, runs in by_command.items():
        walls = [r["wall_s"] for r in runs]
        phases = {k: float(np.mean([r["phases"][k] for r in runs])) for k in runs[0]["phases"]}
        summary[command] = dict(rounds=len(runs), wall_mean_s=float(np.mean(walls)),
                                wall_min_s=min(walls), wall_max_s=max(walls), phases_mean_s=phases,
                                best_val_loss=[r["best_val_loss"] for r in runs])
    nano = summary.get("nanoGPT train.py")
    if nano:
        for command, row in summary.items():
            row["ratio_to_nanogpt"] = row["wall_mean_s"] / nano["wall_mean_s"]
    return summary


def plot(summary: dict, path: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    commands = list(summary)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.7 * len(commands)))
    names = list(dict.fromkeys(k for row in summary.values() for k in row["phases_mean_s"]))
    colors = plt.get_cmap("tab20").colors
    for y, command in enumerate(commands):
        row, left = summary[command], 0.0
        for name, color in zip(names, colors):
            width = row["phases_mean_s"].get(name, 0.0)
            ax.barh(y, width, left=left, color=color, label=name if y == 0 else None)
            left += width
        # a command that logs no phases (nanoGPT's train.py) is one bar of its whole wall time
        rest = "the whole run, not split" if left == 0 else "not accounted for by a phase"
        ax.barh(y, row["wall_mean_s"] - left, left=left, color="0.8" if left else "0.55",
                label=rest if rest not in ax.get_legend_handles_labels()[1] else None)
        ax.text(row["wall_mean_s"], y, f" {row['wall_mean_s']:.1f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(commands)), commands)
    ax.set_xlabel("seconds from start to exit (mean over rounds)")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_end_to_end_benchmark(config, *, workdir, exp_name: str, data_dir: str | None = None,
                             wandb_mode: str | None = None, print_fn=print) -> dict:
    bc = config.bench
    if bc.nanogpt_dir:
        check_nanogpt(pathlib.Path(bc.nanogpt_dir))
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if bc.nanogpt_dir:
        prepare_nanogpt(pathlib.Path(bc.nanogpt_dir), data_dir)
    jobs = [("grassjax", c) for c in bc.commands]
    if bc.nanogpt_dir:
        jobs.append(("nanogpt", "nanoGPT train.py"))
    rounds = []
    for i in range(bc.rounds):
        order = jobs if i % 2 == 0 else jobs[::-1]  # alternated: drift hits every command alike
        runs = []
        for kind, command in order:
            with tempfile.TemporaryDirectory(prefix="grassjax-e2e-") as scratch:
                scratch = pathlib.Path(scratch)
                run = run_nanogpt(bc, scratch) if kind == "nanogpt" else \
                    run_grassjax(command, bc, data_dir, scratch)
            runs.append(run)
            print_fn(f"round {i + 1}/{bc.rounds} {command}: {run['wall_s']:.1f} s (load average "
                     f"{run['load_avg_1m']:.2f} before), best val {run['best_val_loss']:.4f}")
        rounds.append(runs)
    summary = summarise(rounds)
    for c, r in summary.items():
        ratio = f", {r['ratio_to_nanogpt']:.3f}x nanoGPT" if "ratio_to_nanogpt" in r else ""
        print_fn(f"{c}: {r['wall_mean_s']:.1f} s mean over {r['rounds']} rounds "
                 f"({r['wall_min_s']:.1f}-{r['wall_max_s']:.1f}){ratio}")
    results = dict(machine=timing.machine_info(), rounds=rounds, summary=summary,
                   config=config.to_dict())
    write_json(workdir / "results.json", results)
    figure = plot(summary, workdir / "end_to_end.png")
    with RunLogger(workdir=workdir, project=config.wandb.project, name=exp_name, group=exp_name,
                   tags=list(config.wandb.tags), config=config.to_dict(), mode=wandb_mode,
                   job_type="benchmark", print_fn=print_fn) as logger:
        for i, runs in enumerate(rounds):
            logger.log({f"wall_s/{r['command']}": r["wall_s"] for r in runs}, step=i + 1)
        logger.log_images({"end_to_end": _read(figure)}, step=len(rounds))
        logger.set_summary({f"wall_mean_s/{c}": r["wall_mean_s"] for c, r in summary.items()})
    shutil.rmtree(workdir / "tmp", ignore_errors=True)
    return results


def _read(path):
    import matplotlib.image

    return (matplotlib.image.imread(path)[..., :3] * 255).astype(np.uint8)
