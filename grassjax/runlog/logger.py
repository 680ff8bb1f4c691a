"""One object every run logs through: Weights & Biases, plus plain files in the workdir that exist
without it.

The files (metrics.jsonl, images/, tables.jsonl, histograms.jsonl, summary.json, wandb_run_id) and
how a resumed run continues them: docs/dashboard.md. Every W&B row carries "step", the default x
axis of every metric; `step_metrics` gives some keys another one (a time-matched run plots val/*
against perf/elapsed_s).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import pathlib
import re
import shlex
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from grassjax.runlog.records import dumps, json_safe, scalar
from grassjax.runlog.wandb_mode import resolve_wandb_mode

# how long an online wandb.init may wait for the server before we go offline
WANDB_INIT_TIMEOUT_S = 20.0
DEFAULT_SUMMARY_MIN = ("val/loss", "val/bpc", "val/ppl")


def _file_stem(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_") or "image"


def _save_png(image: Any, path: pathlib.Path) -> None:
    """A matplotlib Figure, or an array: (H, W) -> colormapped (uint8 as gray), (H, W, 3|4) ->
    RGB(A)."""
    if hasattr(image, "savefig"):
        image.savefig(path, dpi=100)
        return
    import matplotlib.image

    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        if array.dtype == np.uint8:
            matplotlib.image.imsave(path, array, cmap="gray", vmin=0, vmax=255)
        else:
            matplotlib.image.imsave(path, np.nan_to_num(array.astype(np.float32)))
    elif array.ndim == 3 and array.shape[-1] in (3, 4):
        if array.dtype != np.uint8:
            array = np.clip(np.nan_to_num(array.astype(np.float32)), 0.0, 1.0)
        matplotlib.image.imsave(path, array)
    else:
        raise ValueError(f"{path.name}: an image must be (H, W), (H, W, 1), (H, W, 3) or "
                         f"(H, W, 4), got shape {array.shape}")


class RunLogger:
    """Logs scalars, images, tables and histograms to W&B and to plain files in the workdir.

    Usable as a context manager: leaving the block finishes the run with exit
    code 0, 130 on KeyboardInterrupt and 1 on any other exception.
    """

    def __init__(self, *, workdir, project: str, name: str, group: str | None, tags: Iterable[str],
                 config: dict, mode: str | None = None, job_type: str | None = None,
                 print_fn: Callable[[str], None] = print,
                 summary_min: Sequence[str] = DEFAULT_SUMMARY_MIN,
                 step_metrics: dict[str, str] | None = None):
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mode, self.mode_reason = resolve_wandb_mode(mode)
        self._print = print_fn
        self._finished = False
        self.run = None
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
        if self.mode == "disabled":
            return
        init = dict(project=project, name=name, group=group or None, tags=list(tags),
                    config=dict(config), job_type=job_type, summary_min=tuple(summary_min),
                    step_metrics=dict(step_metrics or {}))
        try:
            self.run = self._init_wandb(self.mode, **init)
        except Exception as e:  # noqa: BLE001
            if self.mode != "online":
                self._jsonl.close()
                raise
            # Online (asked for, or picked by auto) but W&B could not start the run within
            # WANDB_INIT_TIMEOUT_S (no network, server down): keep training, offline, under the
            # same run id, so that every part of a resumed run syncs into one run. wandb-core holds
            # the failed run's id until it is restarted.
            reason = f"{type(e).__name__}: {e}".split("\n")[0][:160]
            self.mode = "offline"
            self.mode_reason = f"online init failed within {WANDB_INIT_TIMEOUT_S:g}s: {reason}"
            import wandb

            with contextlib.suppress(Exception):
                wandb.teardown()
            self.run = self._init_wandb("offline", **init)
        if self.mode == "offline":
            print_fn(f"W&B offline ({self.mode_reason}): run saved in {self.run_dir}; "
                     f"upload later with: wandb sync {shlex.quote(str(self.run_dir))}")
        else:
            print_fn(f"W&B online ({self.mode_reason}): {self.run.url}")

    def _init_wandb(self, mode: str, *, project, name, group, tags, config, job_type, summary_min,
                    step_metrics):
        import wandb
        from wandb.sdk.lib.runid import generate_id

        id_file = self.workdir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
            run_id = generate_id()
            id_file.write_text(run_id + "\n")
        # Never a login prompt: offline/disabled skip login entirely, and online only gets here with
        # credentials (resolve_wandb_mode). silent: our one status line replaces wandb's banner.
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True,
                                  init_timeout=WANDB_INIT_TIMEOUT_S)  # wandb's default waits 90 s
        run = wandb.init(project=project, name=name, group=group, tags=tags, config=config,
                         job_type=job_type, dir=str(self.workdir), mode=mode, id=run_id,
                         resume="allow", reinit="create_new", settings=settings)
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        # {"val/*": "perf/elapsed_s"}: that axis must be in the rows
        for pattern, axis in step_metrics.items():
            run.define_metric(pattern, step_metric=axis)
        for key in summary_min:
            axis = next((a for p, a in step_metrics.items() if fnmatch.fnmatchcase(key, p)), "step")
            run.define_metric(key, step_metric=axis, summary="min,last")
        return run

    # ----------------------------------------------------------------------------------- properties
    @property
    def run_dir(self) -> pathlib.Path | None:
        """W&B's folder for this run (wandb/offline-run-... or wandb/run-...), None when
        disabled."""
        return pathlib.Path(self.run.settings.sync_dir) if self.run is not None else None

    @property
    def run_file(self) -> pathlib.Path | None:
        """The run's transaction log (run-<id>.wandb; see grassjax.runlog.offline), None when
        disabled."""
        return pathlib.Path(self.run.settings.sync_file) if self.run is not None else None

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    # -------------------------------------------------------------------------------------- logging
    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError("RunLogger.finish() was already called")

    def _append(self, filename: str, record: dict) -> None:
        with open(self.workdir / filename, "a", encoding="utf-8") as f:
            f.write(dumps(record) + "\n")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Scalars (Python, NumPy or JAX) at a step: one W&B history row and one metrics.jsonl
        line."""
        self._check_open()
        if "step" in metrics:
            raise ValueError("'step' is the step axis; pass it as the step argument, not as a "
                             "metric")
        step = int(step)
        values = {str(k): scalar(str(k), v) for k, v in metrics.items()}
        self._jsonl.write(dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self.run is not None:
            self.run.log({"step": step, **values})

    def log_images(self, images: dict[str, Any], step: int,
                   caption: str | dict[str, str] | None = None) -> None:
        """Figures or arrays (see _save_png) as W&B images, with PNG copies in <workdir>/images/.

        caption: one caption for all images, or {key: caption}.
        """
        self._check_open()
        step = int(step)
        folder = self.workdir / "images"
        folder.mkdir(exist_ok=True)
        row: dict[str, Any] = {}
        for key, image in images.items():
            path = folder / f"{_file_stem(key)}_{step}.png"
            _save_png(image, path)
            if self.run is not None:
                import wandb

                text = caption.get(key) if isinstance(caption, dict) else caption
                row[key] = wandb.Image(str(path), caption=text)
        if row:
            self.run.log({"step": step, **row})

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        """A W&B table (text samples, report tables), also appended to <workdir>/tables.jsonl."""
        self._check_open()
        step = int(step)
        rows = [[c.item() if isinstance(c, np.generic) else c for c in row] for row in rows]
        self._append("tables.jsonl", {"step": step, "table": key, "columns": list(columns),
                                      "rows": rows})
        if self.run is not None:
            import wandb

            self.run.log({"step": step, key: wandb.Table(columns=list(columns), data=rows)})

    def log_histograms(self, histograms: dict[str, tuple[np.ndarray, int]], step: int,
                       value_range: tuple[float, float] = (0.0, 1.0)) -> None:
        """Pre-binned histograms {key: (counts, bins)} over value_range; copies in
        <workdir>/histograms.jsonl."""
        self._check_open()
        step = int(step)
        row: dict[str, Any] = {}
        for key, (counts, bins) in histograms.items():
            counts = np.asarray(counts)
            edges = np.linspace(*value_range, int(bins) + 1)
            self._append("histograms.jsonl", {"step": step, "histogram": key,
                                              "counts": counts.tolist(), "edges": edges.tolist()})
            if self.run is not None:
                import wandb

                row[key] = wandb.Histogram(np_histogram=(counts, edges))
        if row:
            self.run.log({"step": step, **row})

    def log_artifact(self, name: str, kind: str, files: dict[str, pathlib.Path], *,
                     aliases: Sequence[str] = (), metadata: dict | None = None) -> None:
        """A W&B artifact of `kind` ("model", "report") holding `files` ({name in the artifact: a
        file or folder}), with `aliases`; offline it is written with the run and uploaded by
        `wandb sync`. Nothing without W&B."""
        self._check_open()
        if self.run is None:
            return
        import wandb

        artifact = wandb.Artifact(name, type=kind, metadata=json_safe(metadata or {}))
        for target, path in files.items():
            path = pathlib.Path(path)
            # file by file: add_dir prints a line of its own on the console
            for file in (sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir()
                         else [path]):
                name = target if file == path else f"{target}/{file.relative_to(path).as_posix()}"
                artifact.add_file(str(file), name=name)
        self.run.log_artifact(artifact, aliases=list(aliases))

    def set_summary(self, values: dict[str, Any]) -> None:
        """Run summary values (W&B summary, and merged into <workdir>/summary.json)."""
        self._check_open()
        values = {str(k): (v if isinstance(v, (dict, list)) else scalar(str(k), v))
                  for k, v in values.items()}
        path = self.workdir / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        summary.update(json_safe(values))
        path.write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
        if self.run is not None:
            self.run.summary.update(values)

    # ------------------------------------------------------------------------------------------ end
    def finish(self, exit_code: int = 0, wait_s: float = 60.0) -> None:
        """Close the files and finish the W&B run. Safe to call twice.

        wandb's run.finish() returns before wandb-core has written the run
        file (it does that asynchronously); this waits up to wait_s seconds
        for the file to end with the run's exit record, so the run file is
        complete (grassjax.runlog.offline can read it) once finish returns.
        """
        if self._finished:
            return
        self._finished = True
        self._jsonl.close()
        if self.run is None:
            return
        run_file = self.run_file
        self.run.finish(exit_code=int(exit_code))
        from grassjax.runlog.offline import run_file_complete

        deadline = time.monotonic() + wait_s
        while not run_file_complete(run_file):
            if time.monotonic() > deadline:
                self._print(f"W&B: {run_file} was still incomplete {wait_s:.0f}s after finishing "
                            f"the run")
                return
            time.sleep(0.02)

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        """Finish with exit code 0; for a KeyboardInterrupt its exit_code (a stop on request: 128 +
        signal) or 130; for any other exception 1. After an exception, a failure to finish (a full
        disk) is not raised."""
        if exc_type is None:
            self.finish()
            return False
        code = getattr(exc, "exit_code", 130) if issubclass(exc_type, KeyboardInterrupt) else 1
        with contextlib.suppress(Exception):
            self.finish(exit_code=code)
        return False
