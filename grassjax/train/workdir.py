"""Guards on a run's workdir: writable, held by one process at a time, resumed only by the same run.

* `prepare_workdir` creates the folder and proves it is writable (else one-line WorkdirError).
* `WorkdirLock` holds <workdir>/lock (host and pid) while a run trains there; a stale lock of a dead
  process on this host is taken over.
* `check_resume` compares run_config.json with the config about to resume: keys that shape the
  parameters or the data must match; keys in RESUMABLE may change (optimizer changes are noted).
* `move_aside` is --restart: the old workdir becomes <workdir>.previous-<time>, nothing is deleted.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import pathlib
import socket
from typing import Any, Callable

LOCK_NAME = "lock"
CONFIG_NAME = "run_config.json"
VOCAB_NAME = "vocab.json"
DATA_NAME = "data.json"  # the fingerprint of the tokens the run was trained on
# Keys that may differ when a run is resumed: how long, how often, what is logged, and the
# optimizer's settings (the NaN stop advises a lower learning rate and a rerun) -- never what the
# parameters are or which data they see. Prefixes end with "."; every other key must match exactly.
OPTIMIZER_KEYS = ("train.steps", "train.epochs", "train.learning_rate", "train.min_lr",
                  "train.warmup_steps", "train.weight_decay", "train.beta1", "train.beta2",
                  "train.grad_clip")
RESUMABLE = OPTIMIZER_KEYS + (
    "train.stop_after", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.checkpoint_every", "train.keep_checkpoints", "train.sample_prompt",
    "train.sample_tokens", "train.temperature", "train.top_k",
    "stats.", "wandb.", "compare.", "arms.")


class WorkdirError(RuntimeError):
    """The workdir cannot be used as asked; the message is one line naming the fix.

    exit_code: 2 for a refusal before any work (bad input), 1 for a failure mid-run (a full disk).
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def describe_os_error(err: OSError) -> str:
    """'No space left on device: /path' from an OSError, on one line."""
    reason = err.strerror or type(err).__name__
    return f"{reason}: {err.filename}" if err.filename else reason


def prepare_workdir(workdir: pathlib.Path) -> pathlib.Path:
    """Create workdir and check a file can be written there (before any work is done)."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        what = ("is a file, not a folder"
                if workdir.is_file() or err.errno in (errno.EEXIST, errno.ENOTDIR)
                else f"is not writable ({describe_os_error(err)})")
        raise WorkdirError(f"workdir {workdir} {what}; pass another --workdir=DIR") from None
    return workdir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class WorkdirLock:
    """<workdir>/lock, created atomically (O_EXCL), holding "host pid"; removed on exit."""

    def __init__(self, workdir: pathlib.Path):
        self.path = pathlib.Path(workdir) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.path.read_text().strip() if self.path.exists() else ""
                host, _, pid = owner.partition(" ")
                if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
                    self.path.unlink(missing_ok=True)  # its owner died (kill -9): take it over
                    continue
                raise WorkdirError(f"{self.path.parent} is in use by process {pid or '?'} on "
                                   f"{host or '?'} (lock file {self.path}); wait for it, pass "
                                   f"another --workdir, or delete the lock file if that process is "
                                   f"gone") from None
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self.held = True
            return

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"d_model": 128}} -> {"model.d_model": 128}; tuples become lists (as in JSON)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def config_differences(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(keys that must match but differ, resumable keys that differ), from the saved and the
    current config, both flattened. A key the saved config lacks (added since it was written)
    counts as its default."""
    from grassjax.train.config import default_config

    defaults = flatten(default_config().to_dict())
    old = {**{k: defaults[k] for k in new.keys() - old.keys() if k in defaults}, **old}
    differing = sorted(k for k in old.keys() | new.keys()
                       if old.get(k, "<absent>") != new.get(k, "<absent>"))
    return [k for k in differing if not _resumable(k)], [k for k in differing if _resumable(k)]


def check_resume(workdir: pathlib.Path, config: dict, *, has_checkpoint: bool,
                 print_fn: Callable[[str], None] = print) -> None:
    """Refuse to resume a workdir written by another config (writes nothing; see
    save_run_config)."""
    path = workdir / CONFIG_NAME
    if not (has_checkpoint and path.exists()):
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WorkdirError(f"{path} is unreadable ({type(err).__name__}); pass another --workdir, "
                           f"or --restart to move the old run aside and start over") from None
    from grassjax.train.config import with_legacy_values

    old, new = flatten(with_legacy_values(saved)), flatten(config)
    refused, changed = config_differences(old, new)
    if refused:
        diffs = ", ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
                          for k in refused[:6])
        more = f" (and {len(refused) - 6} more)" if len(refused) > 6 else ""
        # a few scalar keys: the flags that resume it as it was
        flags = [f"--config.{k}={old[k]}" for k in refused
                 if k in old and isinstance(old[k], (str, int, float, bool))]
        resume = (f"to resume it, pass {' '.join(flags)}; or " if len(flags) == len(refused) <= 3
                  else "")
        raise WorkdirError(f"{workdir} holds a run with another config ({diffs}{more}); {resume}"
                           f"pass another --workdir, or --restart to move the old run aside and "
                           f"start over")
    # allowed, but it changes the run: say so
    for key in (k for k in changed if k in OPTIMIZER_KEYS):
        print_fn(f"Note: {key} changed from {old.get(key)} to {new.get(key)} on resume: the "
                 f"learning-rate schedule and optimizer use the new value from here on")


def check_data(workdir: pathlib.Path, vocab: dict, fingerprint: str) -> None:
    """Refuse to resume a run trained on another text: another vocabulary (<workdir>/vocab.json),
    or the same characters in other tokens (the fingerprint in <workdir>/data.json, where the run
    has one)."""
    fix = ("pass the --data_dir it was trained on, another --workdir, or --restart to move the "
           "old run aside and start over")
    saved = _read_json(workdir / VOCAB_NAME)
    if saved is not None and saved != vocab:
        sizes = f": {len(saved['chars'])} characters, this text {len(vocab['chars'])}" \
            if "chars" in saved and "chars" in vocab else ""
        raise WorkdirError(f"{workdir} holds a run trained on another text (its {VOCAB_NAME} "
                           f"differs{sizes}); {fix}")
    data = _read_json(workdir / DATA_NAME)
    if isinstance(data, dict) and data.get("fingerprint") not in (None, fingerprint):
        raise WorkdirError(f"{workdir} holds a run trained on another text (the same characters, "
                           f"other tokens: {DATA_NAME} differs); {fix}")


def _read_json(path: pathlib.Path):
    """The file's JSON, or None where it is missing or unreadable (rewritten once the run is
    restored; the checkpoint's shapes were checked)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def save_run_config(workdir: pathlib.Path, config: dict, vocab: dict, fingerprint: str) -> None:
    """run_config.json, vocab.json and data.json: what the next resume, --mode=sample and load_run
    read."""
    texts = {CONFIG_NAME: json.dumps(config, indent=1, sort_keys=True) + "\n",
             VOCAB_NAME: json.dumps(vocab),
             DATA_NAME: json.dumps({"fingerprint": fingerprint}) + "\n"}
    for name, text in texts.items():
        path = workdir / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


def move_aside(workdir: pathlib.Path,
               print_fn: Callable[[str], None] = print) -> pathlib.Path | None:
    """--restart: rename workdir to <workdir>.previous-<UTC time> (nothing is deleted); the new
    name, or None.

    Refused while another live process holds the workdir's lock.
    """
    workdir = pathlib.Path(workdir)
    if not workdir.exists() or not any(workdir.iterdir()):
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    target = workdir.with_name(f"{workdir.name}.previous-{stamp}")
    with WorkdirLock(workdir):
        try:
            workdir.rename(target)
        except OSError as err:
            raise WorkdirError(f"--restart could not move {workdir} aside "
                               f"({describe_os_error(err)}); move it yourself or pass another "
                               f"--workdir") from None
    (target / LOCK_NAME).unlink(missing_ok=True)  # released by the rename's side of the lock
    print_fn(f"--restart: moved the previous run to {target}")
    return target
