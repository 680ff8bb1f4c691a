"""What every comparison report shares: seed statistics, how the arms were matched, and the report's
own W&B run (its tables and plots, in the comparison's group)."""

from __future__ import annotations

import math
import pathlib
from typing import Sequence

import numpy as np

from grassjax.runlog import RunLogger


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def finite_mean(values) -> float:
    """Mean of the finite values (nan if none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def scaled(value, unit: float) -> float:
    return math.nan if value is None else value / unit


def budget_note(config, plans: dict[str, dict]) -> str:
    """One phrase for the report: how the arms were matched."""
    match = config.compare.get("match", "params")
    steps = ", ".join(f"{arm} {plan['steps']:,}" for arm, plan in plans.items())
    if match == "time":
        return (f"Matched by training time: {config.compare.time_budget_s:g} s per run "
                f"(perf/elapsed_s: the steps and their batches; no compilation, logging or "
                f"evaluation), one arm after the other on this machine, each arm's step count "
                f"fixed from a timed warm-up (`<arm>/steps.json`) so its cosine schedule spans "
                f"the budget; steps: {steps}")
    if match == "tokens":
        return (f"Matched by training tokens: {next(iter(plans.values()))['tokens_budget']:,} "
                f"per run; steps: {steps}")
    return f"{config.train.steps} steps per run" if len({p["steps"] for p in plans.values()}) == 1 \
        else f"Matched by parameters; steps: {steps}"


def log_report(config, report_dir: pathlib.Path, tables: dict[str, list[dict]],
               plots: Sequence[pathlib.Path], *, exp_name: str, group: str,
               wandb_mode: str | None, step: int, print_fn) -> None:
    """The report's own W&B run in the comparison's group: each non-empty table, the plots as
    images, and the report itself (report.md, the plots, summary.json) as a "report" artifact."""
    with RunLogger(workdir=report_dir, project=config.wandb.project, name=f"{exp_name}-report",
                   group=group, tags=list(config.wandb.tags) + ["report"], config=config.to_dict(),
                   mode=wandb_mode, job_type="report", print_fn=print_fn) as logger:
        for key, table in tables.items():
            if table:
                columns = list(table[0])
                logger.log_table(key, columns, [[row[c] for c in columns] for row in table],
                                 step=step)
        logger.log_images({p.stem: _read_png(p) for p in plots}, step=step)
        files = [report_dir / "report.md", report_dir / "summary.json", *plots]
        logger.log_artifact(f"report-{exp_name}", "report",
                            {p.name: p for p in files if p.exists()}, aliases=["latest"],
                            metadata={"exp": exp_name, "group": group})


def _read_png(path: pathlib.Path) -> np.ndarray:
    import matplotlib.image

    return (matplotlib.image.imread(path)[..., :3] * 255).astype(np.uint8)
