"""Head-to-head runs: several model arms x several seeds through the one training loop, then a report.

Every arm shares the config's data, train, stats and wandb sections (same
budget, same data stream and seeds); an arm changes only the model fields
listed under `arms.<name>`. All runs share one W&B group, so the dashboard
overlays them.
"""

from __future__ import annotations

import math
import pathlib
from typing import Callable

import ml_collections
import numpy as np

from grassjax.trained import evaluate_run
from grassjax.train.loop import TrainResult, train
from grassjax.train.run_logger import RunLogger


def arm_config(config, arm: str, seed: int, group: str) -> ml_collections.ConfigDict:
    """The single-run config of one arm and seed."""
    cfg = ml_collections.ConfigDict(config.to_dict())
    for key, value in config.arms[arm].items():
        cfg.model[key] = value
    del cfg.arms, cfg.compare
    cfg.train.seed = seed
    cfg.wandb.group = group
    cfg.wandb.tags = tuple(cfg.wandb.tags) + (f"arm:{arm}",)
    return cfg


def _mean_std(values):
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarise(results: dict[str, list[TrainResult]], evals: dict[str, list[dict]]) -> list[dict]:
    """One row per arm: means (and std over seeds) of the headline numbers.

    The final numbers (val_loss, bpc) are from the evaluation over the whole validation split
    (grassjax.trained.evaluate_run); best_val_loss is the sampled-window estimate the curves use.
    """
    rows = []
    for arm, runs in results.items():
        loss_mean, loss_std = _mean_std([r.best_val_loss for r in runs])
        full_mean, full_std = _mean_std([e["loss"] for e in evals[arm]])
        rows.append(dict(
            arm=arm, seeds=len(runs), params=runs[0].params["total"],
            val_loss=full_mean, val_loss_std=full_std, val_tokens=evals[arm][0]["tokens_scored"],
            best_val_loss=loss_mean, best_val_loss_std=loss_std,
            bpc=full_mean / math.log(2), bpc_std=full_std / math.log(2),
            tokens_per_s=float(np.mean([r.tokens_per_s for r in runs])),
            step_time_ms=float(np.mean([r.step_time_ms for r in runs])),
            step_memory_mb=runs[0].step_memory_bytes / 2**20,
            gflops_per_step=runs[0].step_flops / 1e9,
            wall_time_s=float(np.mean([r.wall_time_s for r in runs])),
        ))
    return rows


def report_markdown(rows: list[dict], samples: dict[str, str], *, exp_name: str, steps: int, baseline: str) -> str:
    base = next(r for r in rows if r["arm"] == baseline)
    lines = [f"# {exp_name}: {', '.join(r['arm'] for r in rows)}", "",
             f"{steps} steps per run; mean ± std over seeds. Val loss and bits/char: the final model over the "
             f"whole validation split ({base['val_tokens']:,} tokens, non-overlapping windows; "
             "`launch.py --mode=evaluate`); best (sampled) is the best of the evaluations on sampled windows "
             f"during training, as in the curves. Gap = val loss relative to `{baseline}` "
             "(positive = worse than it).", "",
             "| arm | params | val loss (whole split) | gap | bits/char | best val loss (sampled) | tokens/s "
             "| step (ms) | step memory (MiB) | GFLOP/step | wall (s) | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = 100 * (r["val_loss"] / base["val_loss"] - 1)
        lines.append(
            f"| {r['arm']} | {r['params']:,} | {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} | "
            f"{gap:+.2f}% | {r['bpc']:.3f} ± {r['bpc_std']:.3f} | "
            f"{r['best_val_loss']:.4f} ± {r['best_val_loss_std']:.4f} | {r['tokens_per_s']:,.0f} | "
            f"{r['step_time_ms']:.1f} | {r['step_memory_mb']:.1f} | {r['gflops_per_step']:.2f} | "
            f"{r['wall_time_s']:.0f} | {r['seeds']} |")
    lines += ["", "Step memory and GFLOP/step are XLA's own analysis of the compiled train step; "
              "tokens/s and step time are medians over logging windows, compilation excluded.", ""]
    for arm, text in samples.items():
        lines += [f"## Sample: {arm} (seed 0, end of training)", "", "```", text.strip("\n"), "```", ""]
    lines += ["## Plots", "", "![val loss](val_loss.png)", "", "![attention entropy](attention_entropy.png)", "",
              "![gate](grassmann_gate.png)", ""]
    return "\n".join(lines)


def plot_report(results: dict[str, list[TrainResult]], out: pathlib.Path) -> list[pathlib.Path]:
    """val_loss.png (band over seeds), attention_entropy.png and grassmann_gate.png per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def band(ax, steps, values, label):
        mean, std = values.mean(0), values.std(0)
        line, = ax.plot(steps, mean, label=label)
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.25)

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, runs in results.items():
        length = min(len(r.history) for r in runs)
        steps = [h["step"] for h in runs[0].history[:length]]
        band(ax, steps, np.array([[h["val/loss"] for h in r.history[:length]] for r in runs]),
             f"{arm} ({len(runs)} seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("validation loss, mean ± std over seeds")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(out / "val_loss.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    for filename, prefix, ylabel, title in [
        ("attention_entropy.png", "attn/entropy/L", "normalised entropy", "attention entropy per layer"),
        ("grassmann_gate.png", "grassmann/gate_mean/L", "mean gate α", "Grassmann gate α per layer"),
    ]:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for arm, runs in results.items():
            length = min(len(r.history) for r in runs)
            if not length:
                continue
            keys = sorted(k for k in runs[0].history[0] if k.startswith(prefix) and "/h" not in k[len(prefix):])
            for key in keys:
                steps = [h["step"] for h in runs[0].history[:length]]
                band(ax, steps, np.array([[h[key] for h in r.history[:length]] for r in runs]),
                     f"{arm} layer {key[len(prefix):]}")
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no arm has this statistic", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title + " (mean ± std over seeds)")
        if drawn:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        paths.append(out / filename)
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def run_comparison(config, *, workdir, exp_name: str, data_dir: str | None = None, wandb_mode: str | None = None,
                   print_fn: Callable[[str], None] = print) -> dict:
    """Train every arm for every seed, then write <workdir>/report/ and log the table to W&B."""
    workdir = pathlib.Path(workdir)
    arms = list(config.compare.arms) + (["grassmann_paper"] if config.compare.paper_variant else [])
    unknown = [a for a in arms if a not in config.arms]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; defined arms: {sorted(config.arms.keys())}")
    seeds = [config.train.seed + i for i in range(config.compare.seeds)]
    group = config.wandb.group or exp_name
    results: dict[str, list[TrainResult]] = {}
    evals: dict[str, list[dict]] = {}
    for seed in seeds:  # seed-major: an interrupted comparison still has every arm at the first seeds
        for arm in arms:
            print_fn(f"== {exp_name}: arm {arm}, seed {seed} ==")
            cfg = arm_config(config, arm, seed, group)
            run_dir = workdir / arm / f"seed{seed}"
            results.setdefault(arm, []).append(
                train(cfg, workdir=run_dir, exp_name=f"{exp_name}-{arm}", data_dir=data_dir,
                      wandb_mode=wandb_mode, print_fn=print_fn))
            evals.setdefault(arm, []).append(evaluate_run(run_dir, data_dir=data_dir, split="val",
                                                          print_fn=lambda *_: None))

    rows = summarise(results, evals)
    report_dir = workdir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    samples = {arm: runs[0].sample for arm, runs in results.items()}
    text = report_markdown(rows, samples, exp_name=exp_name, steps=config.train.steps, baseline=config.compare.baseline)
    (report_dir / "report.md").write_text(text)
    plots = plot_report(results, report_dir)

    columns = list(rows[0])
    with RunLogger(workdir=report_dir, project=config.wandb.project, name=f"{exp_name}-report", group=group,
                   tags=list(config.wandb.tags) + ["report"], config=config.to_dict(), mode=wandb_mode,
                   job_type="report", print_fn=print_fn) as logger:
        logger.log_table("comparison", columns, [[row[c] for c in columns] for row in rows], step=config.train.steps)
        logger.log_images({p.stem: _read_png(p) for p in plots}, step=config.train.steps)
    print_fn(text.split("\n## Sample")[0])
    print_fn(f"report written to {report_dir / 'report.md'}")
    return {"rows": rows, "report_dir": str(report_dir)}


def _read_png(path: pathlib.Path) -> np.ndarray:
    import matplotlib.image

    return (matplotlib.image.imread(path)[..., :3] * 255).astype(np.uint8)
