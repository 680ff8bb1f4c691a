"""Where one invocation of a run spends its wall-clock time, from timestamps the run itself takes.

launch.py marks "main" when its own code starts (the interpreter and the imports before it are
the parent's to time); the loop marks the start and end of each phase and sums the repeated ones
(evaluations, checkpoints, logging). `phases` turns them into seconds per phase, and the run writes
them to <workdir>/timeline.json, which benchmark_end_to_end (grassjax/bench/end_to_end.py) reads.
"""

from __future__ import annotations

import collections
import contextlib
import json
import pathlib
import time


class Timeline:
    """Wall-clock marks (time.time(), comparable across processes) and summed durations."""

    def __init__(self):
        self.marks: dict[str, float] = {}
        self.totals: dict[str, float] = collections.defaultdict(float)

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    @contextlib.contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - t0

    def phases(self, train_s: float) -> dict[str, float]:
        """Seconds per phase between the "main" and "end" marks; `train_s` is the training clock
        (the steps and their batches)."""
        m, t = self.marks, self.totals
        first = m.get("main", m["setup_start"])
        return {
            "start-up: launch.py to the run": m["setup_start"] - first,
            "start-up: data and model": m["setup_end"] - m["setup_start"],
            "start-up: checks and restore": m["compile_start"] - m["setup_end"],
            "compilation": m["compile_end"] - m["compile_start"],
            "W&B start, beyond the compilation": t["wandb"],
            "steps": train_s,
            "evaluations": t["evaluations"],
            "checkpoints": t["checkpoints"],
            "logging": t["logging"],
            "shutdown: W&B and files": m["end"] - m["shutdown"],
        }

    def write(self, path: pathlib.Path, train_s: float) -> None:
        path.write_text(json.dumps({"marks": self.marks, "totals": dict(self.totals),
                                    "train_s": train_s, "phases": self.phases(train_s)},
                                   indent=1) + "\n")


PROCESS = Timeline()  # this process's: launch.py marks "main" on it, the training loop the rest
