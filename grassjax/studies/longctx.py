"""The report of a comparison over block sizes (compare.blocks): who is ahead at equal training
time, from which context length on.

Losses are comparable within a block size, not across: a longer window gives the whole-split
evaluation more context per token.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Sequence

import numpy as np

from grassjax.studies.arms import ArmSpec
from grassjax.studies.report import budget_note, log_report
from grassjax.train.loop import TrainResult


def block_rows(rows: Sequence[dict], specs: Sequence[ArmSpec], baseline: str) -> list[dict]:
    """summarise's rows (one per arm at each block), each with its arm, block and batch, and the gap
    to `baseline` at the same block: delta_loss (nats/token, negative = ahead), delta_se (standard
    error from both seed spreads), ppl_ratio = e^delta_loss."""
    by_name = {r["arm"]: r for r in rows}
    if not any(s.arm == baseline for s in specs):
        raise ValueError(f"compare.baseline {baseline!r} must be one of compare.arms: the gaps are "
                         f"measured to it at each block size")
    out = []
    for spec in specs:
        if spec.name not in by_name:
            continue
        row = by_name[spec.name]
        base = by_name[next(s.name for s in specs if s.arm == baseline and s.block == spec.block)]
        delta = row["val_loss"] - base["val_loss"]
        se = 0.0 if row is base else math.sqrt(row["val_loss_std"] ** 2 / row["seeds"] +
                                               base["val_loss_std"] ** 2 / base["seeds"])
        out.append(dict(row, run=spec.name, arm=spec.arm, block=spec.block,
                        batch=spec.changes.get("train", {}).get("batch_size"),
                        delta_loss=delta, delta_se=se, ppl_ratio=math.exp(delta)))
    return out


def smallest_block_ahead(rows: Sequence[dict], arm: str) -> int | None:
    """The smallest block size at which `arm` has a lower mean val loss than the baseline
    (delta_loss < 0)."""
    return min((r["block"] for r in rows if r["arm"] == arm and r["delta_loss"] < 0), default=None)


CONDITIONS = {"time": "at equal training time", "tokens": "at equal training tokens",
              "params": "at equal steps"}


def verdict(rows: Sequence[dict], arm: str, baseline: str,
            condition: str = CONDITIONS["time"]) -> str:
    """One sentence: the smallest block size at which `arm` is ahead of `baseline` (`condition`), or
    that it is ahead at none."""
    mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["block"])
    largest = mine[-1]["block"]
    first = smallest_block_ahead(mine, arm)
    if first is None:
        closest = min(mine, key=lambda r: r["delta_loss"])
        return (f"`{arm}` is not ahead of `{baseline}` {condition} at any block size up to "
                f"{largest} (closest: {closest['delta_loss']:+.4f} ± {closest['delta_se']:.4f} "
                f"nats at block {closest['block']}).")
    row = next(r for r in mine if r["block"] == first)
    if row["seeds"] < 2:
        spread = "one seed, so no standard error"
    else:
        spread = f"{row['seeds']} seeds; the lead is " + \
            ("more" if -row["delta_loss"] > 2 * row["delta_se"] else "less") + \
            " than twice its standard error"
    ahead = [str(r["block"]) for r in mine if r["delta_loss"] < 0]
    behind = [str(r["block"]) for r in mine if r["delta_loss"] >= 0 and r["block"] > first]
    text = (f"The smallest block size at which `{arm}` is ahead of `{baseline}` {condition} is "
            f"**{first}**: Δ loss {row['delta_loss']:+.4f} ± {row['delta_se']:.4f} nats "
            f"(perplexity ratio {row['ppl_ratio']:.3f}; {spread}). Ahead at: {', '.join(ahead)}")
    return text + (f"; behind again at: {', '.join(behind)}." if behind else ".")


def block_tables_markdown(rows: Sequence[dict], baseline: str) -> list[str]:
    lines = []
    for block in sorted({r["block"] for r in rows}):
        lines += [f"### Block {block}", "",
                  "| arm | batch | steps | tokens | train (s) | val loss (whole split) "
                  f"| Δ loss vs {baseline} | ppl ratio | ms/step | tokens/s "
                  "| step memory, XLA estimate (MiB) | params | seeds |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["block"] == block):
            delta = "—" if r["arm"] == baseline else \
                f"{r['delta_loss']:+.4f} ± {r['delta_se']:.4f}"
            lines.append(f"| {r['arm']} | {r['batch'] or '—'} | {r['steps']:,.0f} | "
                         f"{r['tokens']:,.0f} | {r['train_time_s']:.1f} | "
                         f"{r['val_loss']:.4f} ± {r['val_loss_std']:.4f} | {delta} | "
                         f"{r['ppl_ratio']:.3f} | {r['step_time_ms']:.1f} | "
                         f"{r['tokens_per_s']:,.0f} | "
                         f"{r['step_memory_mb']:.1f} | {r['params']:,} | {r['seeds']} |")
        lines.append("")
    return lines


def report_markdown(rows: Sequence[dict], verdicts: Sequence[str], *, exp_name: str, budget: str,
                    baseline: str) -> str:
    val_tokens = rows[0]["val_tokens"] if rows else 0
    lines = [f"# {exp_name}: {', '.join(dict.fromkeys(r['arm'] for r in rows))} at block sizes "
             f"{', '.join(str(b) for b in sorted({r['block'] for r in rows}))}", "",
             "## Answer", "", *verdicts, "",
             f"{budget}. Mean ± std over seeds. Val loss: each run's best checkpoint (selected on "
             f"the validation batches) over the whole validation split ({val_tokens:,} tokens, "
             f"non-overlapping windows of the block size, "
             f"`launch.py --mode=evaluate`); Δ loss (nats/token, negative = ahead of "
             f"`{baseline}`) ± its standard error over seeds, and the perplexity ratio e^Δ. "
             "Compare within a block size only: longer windows give the whole-split evaluation "
             "more context per token. ms/step and tokens/s are medians over logging windows "
             "(compilation excluded); train (s) is perf/elapsed_s at the end (the steps and their "
             "batches; no compilation, logging, evaluation or checkpoints); step memory is XLA's "
             "estimate for one compiled train step (arguments + outputs + temporaries − "
             "aliased), not a measured peak.", "", "## Per block size", ""]
    lines += block_tables_markdown(rows, baseline)
    lines += ["## Val loss against training time", "",
              "![val loss against training seconds](val_loss_time.png)", ""]
    return "\n".join(lines)


def plot_val_vs_time(results: dict[str, list[TrainResult]], specs: Sequence[ArmSpec],
                     path: pathlib.Path, budget_s: float = 0.0) -> pathlib.Path:
    """One panel per block size: val loss (sampled windows, as logged at each evaluation) against
    perf/elapsed_s, each arm's mean over seeds with a ± std band; the x of an evaluation is its
    mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = sorted({s.block for s in specs if s.name in results})
    fig, axes = plt.subplots(1, len(blocks), figsize=(4.2 * len(blocks), 3.8), squeeze=False,
                             sharey=True)
    for ax, block in zip(axes[0], blocks):
        for spec in (s for s in specs if s.block == block and s.name in results):
            runs = results[spec.name]
            length = min(len(r.history) for r in runs)
            seconds = np.array([[h.get("perf/elapsed_s", math.nan) for h in r.history[:length]]
                                for r in runs])
            losses = np.array([[h["val/loss"] for h in r.history[:length]] for r in runs])
            x, mean, std = seconds.mean(0), losses.mean(0), losses.std(0)
            line, = ax.plot(x, mean, marker=".", label=f"{spec.arm} ({len(runs)} seeds)")
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.25)
        if budget_s > 0:
            ax.axvline(budget_s, color="0.4", linestyle=":", linewidth=1,
                       label=f"budget {budget_s:g} s")
        ax.set_title(f"block {block}")
        ax.set_xlabel("training seconds (perf/elapsed_s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("val loss (sampled windows, nats/token)")
    fig.suptitle("validation loss against training time, mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_block_report(config, specs: Sequence[ArmSpec], rows: Sequence[dict],
                       results: dict[str, list[TrainResult]], plans: dict[str, dict], *,
                       report_dir: pathlib.Path, exp_name: str, group: str,
                       wandb_mode: str | None, print_fn) -> dict:
    """report.md, val_loss_time.png and summary.json in report_dir, and the report's W&B run in
    `group`.

    Per block size: each arm's val loss over the whole validation split at the end of its budget,
    its gap to the baseline arm at the same block (Δ loss with its standard error over seeds,
    perplexity ratio e^Δ), ms/step, tokens/s and XLA's memory estimate of the train step; one
    sentence per arm naming the smallest block size at which it is ahead of the baseline (lower
    mean val loss); and val loss against training seconds, one panel per block size.
    """
    baseline = config.compare.baseline
    table = block_rows(rows, specs, baseline)
    arms = [a for a in dict.fromkeys(s.arm for s in specs) if a != baseline]
    verdicts = [verdict(table, arm, baseline, CONDITIONS[config.compare.get("match", "params")])
                for arm in arms]
    text = report_markdown(table, verdicts, exp_name=exp_name, budget=budget_note(config, plans),
                           baseline=baseline)
    (report_dir / "report.md").write_text(text)
    budget_s = config.compare.time_budget_s if config.compare.get("match") == "time" else 0.0
    plot = plot_val_vs_time(results, specs, report_dir / "val_loss_time.png", budget_s)
    summary = {"match": config.compare.get("match", "params"), "time_budget_s": budget_s,
               "baseline": baseline, "blocks": sorted({s.block for s in specs}), "rows": table,
               "verdicts": verdicts,
               "smallest_block_ahead": {arm: smallest_block_ahead(table, arm) for arm in arms},
               "plans": plans}
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log_report(config, report_dir, {"longctx": table}, [plot], exp_name=exp_name, group=group,
               wandb_mode=wandb_mode, step=max(int(r["steps"]) for r in table), print_fn=print_fn)
    print_fn(text.split("\n## Val loss")[0])
    print_fn(f"report written to {report_dir / 'report.md'}")
    return {"rows": table, "verdicts": verdicts, "report_dir": str(report_dir), "plans": plans,
            "smallest_block_ahead": summary["smallest_block_ahead"]}
