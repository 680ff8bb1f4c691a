"""Run logging: W&B (online, or offline with a `wandb sync` line) plus plain files in the workdir.

logger (RunLogger), wandb_mode (which mode a run gets), records (metrics.jsonl written and read
back), offline (a W&B offline run file read back, without W&B's servers).
"""

from grassjax.runlog.logger import RunLogger
from grassjax.runlog.records import read_metrics_jsonl, rewind_metrics
from grassjax.runlog.wandb_mode import WANDB_MODES, WandbCredentialsError, resolve_wandb_mode

__all__ = ["WANDB_MODES", "RunLogger", "WandbCredentialsError", "read_metrics_jsonl",
           "resolve_wandb_mode", "rewind_metrics"]
