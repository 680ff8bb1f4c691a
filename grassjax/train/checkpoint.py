"""Checkpoints of the train state with orbax: the newest few (to resume from) and the best (to
keep).

<workdir>/checkpoints/<step>/       every train.checkpoint_every steps; the newest
                                    train.keep_checkpoints
<workdir>/checkpoints-best/<step>/  the state of the evaluation with the lowest val loss so far,
                                    with that loss in its metadata; it survives the rolling deletion
Orbax writes a checkpoint into a temporary folder and renames it when complete, so a killed save
leaves no step folder. Saving is synchronous: a Ctrl-C, SIGTERM or NaN stop must find the files
complete.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import io
import logging
import pathlib
import shutil
import sys
import time
import traceback
from typing import Callable

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from grassjax.train.parallel import peer_lost
from grassjax.train.step import TrainState
from grassjax.train.workdir import WorkdirError, describe_os_error

BEST_DIR = "checkpoints-best"
CORRUPT_DIR = "checkpoints-corrupt"
ERROR_LOG = "errors.log"  # details of an unexpected checkpoint error, named by its one line


class CheckpointMismatchError(WorkdirError):
    """The workdir's checkpoints hold parameters of other shapes than the config builds."""


class _Sink(io.TextIOBase):
    """Collects what is written to it (library tracebacks), and when it was last written."""

    def __init__(self):
        self.parts, self.last_write = [], time.monotonic()

    def write(self, text):
        self.parts.append(text)
        self.last_write = time.monotonic()
        return len(text)

    def text(self) -> str:
        return "".join(self.parts)


@contextlib.contextmanager
def quiet_library(settle_s: float = 0.3, max_wait_s: float = 3.0):
    """Keep orbax's absl log lines and the tracebacks its and tensorstore's threads print (asyncio's
    "Event loop is closed", on a failed read or write) off the console; our one line says what
    happened. After an error (other than a lost peer), waits until those threads have stopped
    printing. Yields the collected text."""
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.FATAL)
    sink, stderr = _Sink(), sys.stderr
    sys.stderr = sink
    failed = False
    try:
        yield sink
    except BaseException as err:
        # a lost peer: the process ends at once (lost_peer_exit), before jax.distributed's
        # coordination service notices the peer too and aborts it from C++
        failed = not peer_lost(err)
        raise
    finally:
        if failed:
            # logged when the tasks are collected
            logging.getLogger("asyncio").addFilter(_drop_unretrieved)
            gc.collect()
            deadline = time.monotonic() + max_wait_s
            while time.monotonic() < min(deadline, sink.last_write + settle_s):
                time.sleep(0.05)
        sys.stderr = stderr
        absl_logging.set_verbosity(level)


def _drop_unretrieved(record: logging.LogRecord) -> bool:
    """asyncio's "Task exception was never retrieved", for orbax's writes that failed with the one
    we report."""
    return "exception was never retrieved" not in record.getMessage()


def disk_error(err: BaseException) -> str | None:
    """'No space left on device: /path' for a write that failed on the disk (orbax and tensorstore
    raise ValueError("RESOURCE_EXHAUSTED: ...") or wrap the OSError), else None."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError):
            return describe_os_error(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(err)
    for marker, reason in (("No space left on device", "No space left on device"),
                           ("RESOURCE_EXHAUSTED", "No space left on device"),
                           ("Read-only file system", "Read-only file system"),
                           ("Permission denied", "Permission denied"),
                           ("PERMISSION_DENIED", "Permission denied")):
        if marker in text:
            return reason
    return None


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:200]


def _flat_shapes(tree) -> dict[str, tuple]:
    """{"params.embed.embedding": (65, 128), ...} from a state or orbax's metadata of one."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        if parts and parts[-1] == "value":  # nnx.Param's field, in orbax's metadata names
            parts = parts[:-1]
        if hasattr(leaf, "shape"):
            out[".".join(parts)] = tuple(leaf.shape)
    return out


class Checkpointer:
    """Saves TrainState under <workdir>/checkpoints/ (and the best under checkpoints-best/),
    restores the newest one that reads back. read_only: never creates, moves or deletes anything (a
    run being used)."""

    def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 2,
                 read_only: bool = False, asynchronous: bool = False):
        self.workdir = pathlib.Path(workdir).resolve()
        self.directory = self.workdir / "checkpoints"
        self.best_directory = self.workdir / BEST_DIR
        self.max_to_keep, self.read_only = max_to_keep, read_only
        # asynchronous: a save returns once the arrays are on the host; the files are written in the
        # background and renamed when whole (so a kill still leaves only whole checkpoints). Single
        # process only: orbax's background barriers would interleave with the training collectives.
        self.asynchronous = asynchronous and jax.process_count() == 1
        self._pending: list[tuple[ocp.CheckpointManager, str]] = []  # saves still being written
        self._saved: dict[str, int] = {}  # the step each manager last saved
        self.manager = self._manager(self.directory, max_to_keep)
        self._best = None  # the best's manager, made when first needed

    def _manager(self, directory: pathlib.Path, max_to_keep: int) -> ocp.CheckpointManager:
        with quiet_library():  # it reads every step's metadata, which may be a corrupt one
            options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                   enable_async_checkpointing=self.asynchronous,
                                                   create=not self.read_only,
                                                   read_only=self.read_only)
            return ocp.CheckpointManager(directory, options=options,
                                         item_handlers=ocp.StandardCheckpointHandler())

    @property
    def best_manager(self) -> ocp.CheckpointManager | None:
        if self._best is None and (self.best_directory.is_dir() or not self.read_only):
            self._best = self._manager(self.best_directory, 1)
        return self._best

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        if not self.best_directory.is_dir():
            return None
        return self.best_manager.latest_step()

    def best_val_loss(self) -> float:
        """The val loss recorded with the best checkpoint; WorkdirError where its metadata is
        unreadable."""
        step = self.best_step()
        try:
            with quiet_library():
                return float(self.best_manager.metadata(step).custom_metadata["val_loss"])
        except Exception as err:  # noqa: BLE001 - a truncated or missing metadata file
            raise WorkdirError(f"the best checkpoint (step {step}) in {self.best_directory} is "
                               f"unreadable ({_first_line(err)})") from None

    # --------------------------------------------------------------------------------------- saving
    def save(self, state: TrainState, *, wait: bool = False) -> int:
        """Save `state` (unless its step is saved already); with `wait`, return once every pending
        save is on disk."""
        step = int(jax.device_get(state.step))
        if self._saved.get("latest", self.manager.latest_step()) != step:
            self._write(self.manager, step, state, what=f"the checkpoint of step {step}")
            self._saved["latest"] = step
        if wait:
            self.wait()
        return step

    def save_best(self, state: TrainState, val_loss: float) -> int:
        """`state` as the best, with its val loss; the previous best is deleted once this one is
        whole."""
        step = int(jax.device_get(state.step))
        self._write(self.best_manager, step, state, what=f"the best checkpoint (step {step})",
                    custom_metadata={"val_loss": float(val_loss), "step": step})
        self._saved["best"] = step
        return step

    def saved_best_step(self) -> int | None:
        """The best checkpoint's step, counting one still being written."""
        return self._saved.get("best", self.best_step())

    def wait(self) -> None:
        """Until every save is on disk; WorkdirError (one line) for one that failed."""
        while self._pending:
            manager, what = self._pending.pop(0)
            self._guarded(manager, what, manager.wait_until_finished)

    def _write(self, manager, step: int, state: TrainState, *, what: str,
               custom_metadata=None) -> None:
        self.wait()  # a failure of the previous save is reported as that save's

        def write():
            manager.save(step, args=ocp.args.StandardSave(state._asdict()), force=True,
                         custom_metadata=custom_metadata or {})
            if not self.asynchronous:
                manager.wait_until_finished()

        self._guarded(manager, what, write)
        if self.asynchronous:
            self._pending.append((manager, what))

    def _guarded(self, manager, what: str, action) -> None:
        try:
            with quiet_library():
                action()
        except Exception as err:  # noqa: BLE001 - orbax raises ValueError, wraps OSError, ...
            if peer_lost(err):  # a collective save whose other writers are gone: the loop says so
                raise
            self._remove_temporary(manager.directory)
            kept = self.manager.latest_step()
            reason = disk_error(err)
            if reason is None:  # not the disk: keep the details for a bug report
                reason = f"{_first_line(err)}; details in {self._log_details(err)}"
            raise WorkdirError(f"cannot write {what} ({reason}); the run stopped, the last good "
                               f"checkpoint is step {kept} in {self.directory}; free space and "
                               f"rerun to resume",
                               exit_code=1) from None

    def _log_details(self, err: BaseException) -> pathlib.Path:
        path = self.workdir / ERROR_LOG
        with contextlib.suppress(OSError):
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')}\n")
                f.write("".join(traceback.format_exception(err)))
        return path

    def remove_temporary(self) -> None:
        """Half-written checkpoints (*.orbax-checkpoint-tmp*) left by an aborted save."""
        for directory in (self.directory, self.best_directory):
            self._remove_temporary(directory)

    def _remove_temporary(self, directory) -> None:
        if self.read_only or jax.process_index() != 0:
            return
        for path in pathlib.Path(directory).glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(path, ignore_errors=True)

    def drop_best_after(self, step: int) -> None:
        """A best checkpoint from past `step` (a run resumed from an older checkpoint) is
        forgotten, as the evaluations logged past it are."""
        best = self.best_step()
        if best is not None and best > step and jax.process_index() == 0:
            with quiet_library():
                self.best_manager.delete(best)

    # -------------------------------------------------------------------------------------- reading
    def check_fits(self, template: TrainState, step: int, *, best: bool = False) -> None:
        """CheckpointMismatchError naming the parameters whose shapes differ from `template`'s."""
        manager = self.best_manager if best else self.manager
        try:
            with quiet_library():
                saved = _flat_shapes(manager.item_metadata(step))
        except Exception:  # noqa: BLE001 - unreadable metadata: restoring says so
            return
        wanted = {k: v for k, v in _flat_shapes(template._asdict()).items()
                  if k.startswith("params.")}
        saved = {k: v for k, v in saved.items() if k.startswith("params.")}
        if not saved:
            return
        differ = [k for k in sorted(wanted.keys() | saved.keys()) if wanted.get(k) != saved.get(k)]
        if differ:
            shown = ", ".join(f"{k[len('params.'):]}: saved {saved.get(k, 'absent')} vs "
                              f"{wanted.get(k, 'absent')}" for k in differ[:3])
            more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
            raise CheckpointMismatchError(f"{manager.directory}/{step} holds a model of another "
                                          f"shape ({shown}{more})")

    def restore(self, template: TrainState, step: int | None = None, *,
                best: bool = False) -> TrainState:
        """Restore into the structure (and shardings) of `template`."""
        manager = self.best_manager if best else self.manager
        step = manager.latest_step() if step is None else step
        self.check_fits(template, step, best=best)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template._asdict())
        with quiet_library():
            restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return TrainState(**restored)

    def restore_newest_good(self, template: TrainState,
                            print_fn: Callable[[str], None] = print) -> TrainState:
        """The newest checkpoint that restores.

        Ones that do not (a truncated file, a bad disk) are moved to <workdir>/checkpoints-corrupt/
        with a warning line (read_only: skipped, nothing moved); if none restores, WorkdirError
        (nothing moved). A model of another shape is CheckpointMismatchError."""
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self.restore(template, step)
            except CheckpointMismatchError:
                raise
            except Exception as err:  # noqa: BLE001 - orbax raises JSONDecodeError, ValueError, ...
                failures.append((step, _first_line(err)))
                continue
            if failures and not self.read_only:
                self._move_aside([s for s, _ in failures])
            for bad, reason in failures:
                where = "skipped" if self.read_only else f"moved to {self.workdir / CORRUPT_DIR}"
                print_fn(f"Warning: checkpoint {bad} is unreadable ({reason}); {where}, "
                         f"{'using' if self.read_only else 'resuming from'} step {step}")
            return state
        bad, reason = failures[0]
        raise WorkdirError(f"no checkpoint in {self.directory} can be restored (newest, step "
                           f"{bad}: {reason}); pass another --workdir, or --restart to move the "
                           f"old run aside and start over")

    def _move_aside(self, steps: list[int]) -> None:
        target = self.workdir / CORRUPT_DIR
        if jax.process_index() == 0:
            target.mkdir(exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        for step in steps:
            if jax.process_index() == 0:  # the one writer; the others only re-read the folder
                (self.directory / str(step)).rename(target / f"{step}-{stamp}")
        self.manager.close()
        # it caches the list of steps
        self.manager = self._manager(self.directory, self.max_to_keep)

    def move_best_aside(self) -> None:
        """A best checkpoint that cannot be read goes to checkpoints-corrupt/ (the next improvement
        writes a new one)."""
        step = self.best_step()
        if step is None or self.read_only or jax.process_index() != 0:
            return
        target = self.workdir / CORRUPT_DIR
        target.mkdir(exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        (self.best_directory / str(step)).rename(target / f"best-{step}-{stamp}")
        self._best.close()
        self._best = None

    def close(self):
        try:
            self.wait()
        finally:
            self.manager.close()
            if self._best is not None:
                self._best.close()
