"""Head-to-head runs: several model arms x several seeds through the one training loop, then a
report.

Every arm shares the config's data, train, stats and wandb sections (same
budget, same data stream and seeds); an arm changes only the model fields
listed under `arms.<name>`, and the train or data settings under its `train` and
`data` keys. compare.match decides how long each arm trains (grassjax.studies.matching);
compare.blocks runs every arm at several block sizes, reported by grassjax.studies.longctx.
All runs share one W&B group, so the dashboard overlays them.
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
from typing import Callable, Sequence

import numpy as np

from grassjax.baselines.runner import fit_ngram_lines
from grassjax.inference import evaluate_run
from grassjax.studies.ablation import waterfall, waterfall_markdown
from grassjax.studies.arms import arm_config, comparison_arms
from grassjax.studies.longctx import write_block_report
from grassjax.studies.matching import apply_plan, plan_steps
from grassjax.studies.report import budget_note, finite_mean, log_report, mean_std, scaled
from grassjax.train.loop import TrainResult, train


# An arm whose last sampled val loss ends this far above its best (nats, mean over seeds) has
# overfitted: the report says so (its final model's whole-split loss then measures the overfitting
# as well as the architecture; the gaps are its best checkpoint's).
OVERFIT_NATS = 0.05


def summarise(results: dict[str, list[TrainResult]],
              evals: dict[str, list[dict]]) -> list[dict]:
    """One row per arm: means (and std over seeds) of the headline numbers.

    val_loss and bpc are the best checkpoints' losses over the whole split
    (`evaluate_kept_and_final`; checkpoint_step the step they were saved at), final_val_loss the
    final models'; best_val_loss is the sampled-window estimate the curves use, best_step where it
    was reached, and overfit how far the last sampled estimate ended above it.
    """
    rows = []
    for arm, runs in results.items():
        loss_mean, loss_std = mean_std([r.best_val_loss for r in runs])
        evals_of = [[h for h in r.history if "val/loss" in h] for r in runs]
        best_step = overfit = math.nan
        if all(evals_of):
            # each run's best evaluation
            bests = [min(h, key=lambda e: e["val/loss"]) for h in evals_of]
            best_step = float(np.mean([b["step"] for b in bests]))
            overfit = float(np.mean([h[-1]["val/loss"] - b["val/loss"]
                                     for h, b in zip(evals_of, bests)]))
        full_mean, full_std = mean_std([e["loss"] for e in evals[arm]])
        final_mean, final_std = mean_std([e.get("final", e)["loss"] for e in evals[arm]])
        rows.append(dict(
            arm=arm, seeds=len(runs), params=runs[0].params["total"],
            val_loss=full_mean, val_loss_std=full_std, val_tokens=evals[arm][0]["tokens_scored"],
            split=evals[arm][0].get("split", "val"),
            checkpoint_step=float(np.mean([e.get("step", math.nan) for e in evals[arm]])),
            final_val_loss=final_mean, final_val_loss_std=final_std,
            best_val_loss=loss_mean, best_val_loss_std=loss_std, best_step=best_step,
            overfit=overfit, bpc=full_mean / math.log(2), bpc_std=full_std / math.log(2),
            # a run resumed at its end timed no step
            tokens_per_s=finite_mean([r.tokens_per_s for r in runs]),
            step_time_ms=finite_mean([r.step_time_ms for r in runs]),
            # nan where XLA gives no number
            step_memory_mb=scaled(runs[0].step_memory_bytes, 2**20),
            gflops_per_step=scaled(runs[0].step_flops, 1e9),
            wall_time_s=float(np.mean([r.wall_time_s for r in runs])),
            steps=float(np.mean([r.final_step for r in runs])),
            tokens=float(np.mean([r.final_step * r.tokens_per_step for r in runs])),
            # perf/elapsed_s at the end
            train_time_s=float(np.mean([r.train_time_s for r in runs])),
        ))
    return rows


def add_gaps(rows: list[dict], baseline: str) -> list[dict]:
    """Each row plus its gap to the `baseline` arm in the headline val loss (whole split):
    delta_loss (nats/token, positive = worse), the perplexity ratio e^delta_loss, and gap_pct
    (relative difference)."""
    base = next(r for r in rows if r["arm"] == baseline)["val_loss"]
    return [dict(r, delta_loss=r["val_loss"] - base, ppl_ratio=math.exp(r["val_loss"] - base),
                 gap_pct=100 * (r["val_loss"] / base - 1)) for r in rows]


def report_markdown(rows: list[dict], samples: dict[str, str], *, exp_name: str, steps: int,
                    baseline: str, ngram_rows: Sequence[dict] = (),
                    waterfall_steps: Sequence[dict] = (), waterfall_reference: str = "",
                    budget: str = "") -> str:
    """The report: one table row per arm, then one per n-gram reference model (no training columns),
    then the waterfall when one was computed. `budget` says how the arms were matched (default:
    `steps` steps per run)."""
    base = next(r for r in rows if r["arm"] == baseline)
    rows = add_gaps(rows, baseline)
    lines = [f"# {exp_name}: {', '.join(r['arm'] for r in rows)}", "",
             f"{budget or f'{steps} steps per run'}; mean ± std over seeds. Loss and bits/char: "
             f"each run's best checkpoint, the model a user keeps, over the whole "
             f"{_split_name(base)} ({base['val_tokens']:,} tokens, non-overlapping windows; "
             "`launch.py --mode=evaluate`), at the step given; the best was selected on the "
             "validation batches (its lowest val loss among the evaluations during training). "
             "The final model's loss is beside it, at the run's last step. Best (sampled) is the "
             "best of those evaluations on sampled windows, as in the curves. Gaps are the best "
             f"checkpoints' to `{baseline}` (positive = worse than it): Δ loss in nats/token, the "
             "perplexity ratio e^Δ, and the relative difference.", "",
             f"| arm | params | loss, best checkpoint ({_split_name(base)}) | at step | Δ loss | "
             "ppl ratio | gap | bits/char | loss, final model | at step | best val loss "
             "(sampled) | tokens/s | step (ms) | step memory (MiB) | GFLOP/step | steps | "
             "train (s) | wall (s) | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['params']:,} | {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} | "
            f"{_step(r.get('checkpoint_step'))} | {r['delta_loss']:+.4f} | {r['ppl_ratio']:.3f} | "
            f"{r['gap_pct']:+.2f}% | {r['bpc']:.3f} ± {r['bpc_std']:.3f} | "
            f"{r.get('final_val_loss', r['val_loss']):.4f} ± "
            f"{r.get('final_val_loss_std', r['val_loss_std']):.4f} | {_step(r['steps'])} | "
            f"{r['best_val_loss']:.4f} ± {r['best_val_loss_std']:.4f} | "
            f"{r['tokens_per_s']:,.0f} | "
            f"{r['step_time_ms']:.1f} | {r['step_memory_mb']:.1f} | {r['gflops_per_step']:.2f} | "
            f"{r['steps']:.0f} | {r['train_time_s']:.1f} | {r['wall_time_s']:.0f} | {r['seeds']} |")
    for r in ngram_rows:  # count-based references: same split, no parameters trained
        delta = r["val_loss"] - base["val_loss"]
        gap = 100 * (r["val_loss"] / base["val_loss"] - 1)
        lines.append(f"| {r['name']} | — | {r['val_loss']:.4f} | — | {delta:+.4f} | "
                     f"{math.exp(delta):.3f} | {gap:+.2f}% | "
                     f"{r['val_bpc']:.3f} | — | — | — | — | — | — | — | — | — | "
                     f"{r['fit_s'] + r['score_s']:.1f} | — |")
    overfitted = [r for r in rows if r.get("overfit", 0.0) > OVERFIT_NATS]
    if overfitted:
        each = ", ".join(f"`{r['arm']}` {r['overfit']:.3f} nats above its best "
                         f"(reached at step {r['best_step']:,.0f})"
                         for r in sorted(overfitted, key=lambda r: -r["overfit"]))
        lines += ["", f"**Overfitting.** The last sampled val loss ends {each}, mean over seeds. "
                  "The final models' column measures how much each arm overfits as well as the "
                  "architecture; the gaps are the best checkpoints'."]
    if ngram_rows:
        lines += ["", "n-gram rows: interpolated Kneser–Ney fitted on the training split and "
                  "scored on every validation token with up to its context length before it "
                  "(grassjax.baselines); drawn as dashed lines on the val-loss plot."]
    lines += ["", "Step memory and GFLOP/step are XLA's own analysis of the compiled train step; "
              "tokens/s and step time are medians over logging windows, compilation excluded; "
              "train (s) is perf/elapsed_s at the end (the steps and their batches: no "
              "compilation, logging, evaluation or checkpoints), wall (s) the run's whole loop.",
              ""]
    if waterfall_steps:
        lines += [waterfall_markdown(list(waterfall_steps), reference=waterfall_reference,
                                     baseline=baseline), ""]
    for arm, text in samples.items():
        lines += [f"## Sample: {arm} (seed 0, end of training)", "", "```", text.strip("\n"), "```",
                  ""]
    lines += ["## Plots", "", "![val loss](val_loss.png)", "",
              "![attention entropy](attention_entropy.png)", "",
              "![gate](grassmann_gate.png)", ""]
    return "\n".join(lines)


def _split_name(row: dict) -> str:
    return {"val": "validation split", "test": "test split"}.get(row.get("split", "val"), "split")


def _step(value) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:,.0f}"


def plot_report(results: dict[str, list[TrainResult]], out: pathlib.Path,
                ngram_rows: Sequence[dict] = ()) -> list[pathlib.Path]:
    """val_loss.png (band over seeds; n-gram references as horizontal lines), attention_entropy.png
    and grassmann_gate.png per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def band(ax, steps, values, label, color=None):
        mean, std = values.mean(0), values.std(0)
        line, = ax.plot(steps, mean, label=label, color=color)
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.25)

    fig, ax = plt.subplots(figsize=(6, 4))
    # One colour per arm: tab10 repeats after 10 arms, which an ablation exceeds.
    colors = plt.get_cmap("tab10" if len(results) <= 10 else "tab20").colors
    for (arm, runs), color in zip(results.items(), itertools.cycle(colors)):
        length = min(len(r.history) for r in runs)
        steps = [h["step"] for h in runs[0].history[:length]]
        band(ax, steps, np.array([[h["val/loss"] for h in r.history[:length]] for r in runs]),
             f"{arm} ({len(runs)} seed{'s' if len(runs) > 1 else ''})", color)
    for r, style in zip(ngram_rows, itertools.cycle([":", "--", "-."])):
        ax.axhline(r["val_loss"], color="0.35", linestyle=style, linewidth=1,
                   label=f"{r['order']}-gram KN ({r['val_loss']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("validation loss, mean ± std over seeds")
    # an ablation: the legend would hide the curves, put it beside them
    if len(results) + len(ngram_rows) > 5:
        fig.set_size_inches(9, 4)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend()
    ax.grid(alpha=0.3)
    paths.append(out / "val_loss.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    for filename, prefix, ylabel, title in [
        ("attention_entropy.png", "attn/entropy/L", "normalised entropy",
         "attention entropy per layer"),
        ("grassmann_gate.png", "grassmann/gate_mean/L", "mean gate α",
         "Grassmann gate α per layer"),
    ]:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for arm, runs in results.items():
            length = min(len(r.history) for r in runs)
            if not length:
                continue
            keys = sorted(k for k in runs[0].history[0]
                          if k.startswith(prefix) and "/h" not in k[len(prefix):])
            for key in keys:
                steps = [h["step"] for h in runs[0].history[:length]]
                band(ax, steps, np.array([[h[key] for h in r.history[:length]] for r in runs]),
                     f"{arm} layer {key[len(prefix):]}")
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no arm has this statistic", ha="center", va="center",
                    transform=ax.transAxes)
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


def report_split(cfg) -> str:
    """The split the report scores: validation where it is also what selects the best checkpoint
    (tiny Shakespeare has no other), the held-out test split where the dataset has one."""
    return "test" if cfg.data.dataset == "wikitext2" else "val"


def evaluate_kept_and_final(run_dir: pathlib.Path, cfg, data_dir: str | None) -> dict:
    """The whole-split evaluation of a run's best checkpoint (its lowest val loss on the sampled
    validation batches: selected on validation data), with the final model's under "final"."""
    quiet = lambda *_: None  # noqa: E731
    split = report_split(cfg)
    # The default checkpoint: the best, or the newest for a run trained before bests were kept.
    best = evaluate_run(run_dir, data_dir=data_dir, split=split, print_fn=quiet)
    final = best if best["step"] == _latest_step(run_dir) else \
        evaluate_run(run_dir, data_dir=data_dir, split=split, checkpoint="latest", print_fn=quiet)
    return {**best, "final": final}


def _latest_step(run_dir: pathlib.Path) -> int | None:
    from grassjax.train.checkpoint import Checkpointer

    checkpointer = Checkpointer(run_dir, read_only=True)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def run_comparison(config, *, workdir, exp_name: str, data_dir: str | None = None,
                   wandb_mode: str | None = None,
                   print_fn: Callable[[str], None] = print) -> dict:
    """Train every arm for every seed, then write <workdir>/report/ and log the table to W&B."""
    workdir = pathlib.Path(workdir)
    specs = comparison_arms(config)
    seeds = [config.train.seed + i for i in range(config.compare.seeds)]
    group = config.wandb.group or exp_name
    plans = plan_steps(config, {s.name: arm_config(config, s.arm, seeds[0], group, s)
                                for s in specs}, workdir, data_dir, print_fn)
    results: dict[str, list[TrainResult]] = {}
    evals: dict[str, list[dict]] = {}
    # Screen, then confirm: arms not among compare.finalists (empty: all) run at the first seed
    # only.
    finalists = set(config.compare.get("finalists", ())) or {s.arm for s in specs}
    # seed-major: an interrupted comparison still has every arm at the first seeds
    for seed in seeds:
        for spec in specs if seed == seeds[0] else [s for s in specs if s.arm in finalists]:
            print_fn(f"== {exp_name}: arm {spec.name}, seed {seed} ==")
            cfg = apply_plan(arm_config(config, spec.arm, seed, group, spec), plans[spec.name],
                             config.compare.get("evals_per_run", 0))
            run_dir = workdir / spec.name / f"seed{seed}"
            results.setdefault(spec.name, []).append(
                train(cfg, workdir=run_dir, exp_name=f"{exp_name}-{spec.name}", data_dir=data_dir,
                      wandb_mode=wandb_mode, print_fn=print_fn))
            evals.setdefault(spec.name, []).append(evaluate_kept_and_final(run_dir, cfg, data_dir))
    rows = summarise(results, evals)
    report_dir = workdir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    if config.compare.get("blocks"):
        return write_block_report(config, specs, rows, results, plans, report_dir=report_dir,
                                  exp_name=exp_name, group=group, wandb_mode=wandb_mode,
                                  print_fn=print_fn)
    return _write_report(config, rows, results, plans, report_dir=report_dir, exp_name=exp_name,
                         group=group, data_dir=data_dir, wandb_mode=wandb_mode, print_fn=print_fn)


def _write_report(config, rows, results, plans, *, report_dir, exp_name, group, data_dir,
                  wandb_mode, print_fn):
    # Count-based references on the same split (seconds of NumPy; none unless
    # compare.ngram_contexts is set).
    ngram_rows = fit_ngram_lines(config, contexts=config.compare.get("ngram_contexts", ()),
                                 split=report_split(config),
                                 data_dir=data_dir)
    samples = {arm: runs[0].sample for arm, runs in results.items()}
    reference = config.compare.get("waterfall_reference", "")
    waterfall_steps = []
    if reference:  # ablations: how much of the reference arm's gap to the baseline each arm closes
        if reference not in results or config.compare.baseline not in results:
            raise ValueError(f"compare.waterfall_reference {reference!r} and compare.baseline "
                             f"{config.compare.baseline!r} must both be among the arms run: "
                             f"{list(results)}")
        waterfall_steps = waterfall(rows, reference=reference, baseline=config.compare.baseline,
                                    changes={arm: config.arms[arm].to_dict() for arm in results})
    text = report_markdown(rows, samples, exp_name=exp_name, steps=config.train.steps,
                           baseline=config.compare.baseline, ngram_rows=ngram_rows,
                           waterfall_steps=waterfall_steps, waterfall_reference=reference,
                           budget=budget_note(config, plans))
    (report_dir / "report.md").write_text(text)
    (report_dir / "summary.json").write_text(json.dumps(
        {"rows": add_gaps(rows, config.compare.baseline), "ngram_rows": ngram_rows,
         "waterfall": waterfall_steps, "baseline": config.compare.baseline,
         "waterfall_reference": reference, "steps": config.train.steps,
         "match": config.compare.get("match", "params"), "plans": plans}, indent=2))
    plots = plot_report(results, report_dir, ngram_rows)
    tables = {"comparison": rows, "ngram": ngram_rows, "waterfall": waterfall_steps}
    log_report(config, report_dir, tables, plots, exp_name=exp_name, group=group,
               wandb_mode=wandb_mode, step=config.train.steps, print_fn=print_fn)
    print_fn(text.split("\n## Sample")[0])
    print_fn(f"report written to {report_dir / 'report.md'}")
    return {"rows": rows, "ngram_rows": ngram_rows, "waterfall": waterfall_steps,
            "report_dir": str(report_dir), "plans": plans}


