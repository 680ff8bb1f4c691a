"""One object every run logs through: Weights & Biases, plus a plain JSONL copy of every scalar.

W&B mode "auto" picks online only when credentials exist, else offline, so
the program never waits at a login prompt. metrics.jsonl in the workdir holds
every logged scalar whatever the mode (non-finite values are written as null).
"""

from __future__ import annotations

import json
import math
import netrc
import os
import pathlib
import uuid
from typing import Any, Callable

import numpy as np

WANDB_MODES = ("auto", "online", "offline", "disabled")


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(requested: str | None) -> tuple[str, str]:
    """(mode, reason) for a requested mode in WANDB_MODES (None means auto)."""
    requested = requested or "auto"
    if requested not in WANDB_MODES:
        raise ValueError(f"unknown W&B mode {requested!r}; valid: {', '.join(WANDB_MODES)}")
    if requested != "auto":
        return requested, f"--wandb_mode={requested}"
    if _has_credentials():
        return "online", "credentials found"
    return "offline", "no credentials found"


def _scalar(value: Any) -> float | int | None:
    value = np.asarray(value).item() if not isinstance(value, (int, float)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    """Logs scalars, images, tables and histograms to W&B and to <workdir>/metrics.jsonl."""

    def __init__(self, *, workdir, project: str, name: str, group: str | None, tags: list[str], config: dict,
                 mode: str | None = None, job_type: str | None = None, print_fn: Callable[[str], None] = print):
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mode, reason = resolve_wandb_mode(mode)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
        self._finished = False
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        # A rerun in the same workdir continues the same W&B run.
        id_file = self.workdir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=project, name=name, group=group or None, tags=list(tags), config=config, dir=str(self.workdir),
            mode=self.mode, id=run_id, resume="allow", job_type=job_type, reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.run.define_metric("val/loss", step_metric="step", summary="min")
        self.run.define_metric("val/bpc", step_metric="step", summary="min")
        if self.mode == "offline":
            print_fn(f"W&B offline ({reason}): run saved in {self.run_dir}; upload later with: "
                     f"wandb sync {self.run_dir}")

    @property
    def run_dir(self) -> pathlib.Path | None:
        """W&B's folder for this run (offline-run-... or run-...), None when disabled."""
        return pathlib.Path(self.run.dir).parent if self.run is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        values = {k: _scalar(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        if self.run is not None:
            self.run.log({"step": int(step), **{k: (math.nan if v is None else v) for k, v in values.items()}},
                         step=int(step))

    def log_images(self, images: dict[str, Any], step: int) -> None:
        """Images as matplotlib figures or (H, W, 3) uint8 arrays; PNG copies go to <workdir>/images/."""
        folder = self.workdir / "images"
        folder.mkdir(exist_ok=True)
        for key, image in images.items():
            path = folder / f"{key.replace('/', '_')}_{int(step)}.png"
            if hasattr(image, "savefig"):
                image.savefig(path, dpi=100)
            else:
                import matplotlib.image

                matplotlib.image.imsave(path, np.asarray(image))
            if self.run is not None:
                import wandb

                self.run.log({"step": int(step), key: wandb.Image(str(path))}, step=int(step))

    def log_histograms(self, histograms: dict[str, tuple[np.ndarray, int]], step: int,
                       value_range: tuple[float, float] = (0.0, 1.0)) -> None:
        """Pre-binned histograms: {key: (counts, bins)} over value_range."""
        for key, (counts, bins) in histograms.items():
            edges = np.linspace(*value_range, bins + 1)
            self._jsonl.write(json.dumps({"step": int(step), "histogram": key,
                                          "counts": np.asarray(counts).tolist(), "edges": edges.tolist()}) + "\n")
            if self.run is not None:
                import wandb

                hist = wandb.Histogram(np_histogram=(np.asarray(counts), edges))
                self.run.log({"step": int(step), key: hist}, step=int(step))
        self._jsonl.flush()

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        with open(self.workdir / "tables.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), "table": key, "columns": columns, "rows": rows}, default=str) + "\n")
        if self.run is not None:
            import wandb

            self.run.log({"step": int(step), key: wandb.Table(columns=columns, data=rows)}, step=int(step))

    def set_summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = _scalar(value)

    def finish(self, exit_code: int = 0) -> None:
        if self._finished:
            return
        self._finished = True
        self._jsonl.close()
        if self.run is not None:
            self.run.finish(exit_code=exit_code)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.finish(exit_code=0 if exc_type is None else 1)
        return False


def read_metrics_jsonl(path) -> list[dict]:
    """The scalar records of a metrics.jsonl (histogram lines skipped)."""
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "histogram" not in r]
