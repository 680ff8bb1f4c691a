"""What must not corrupt a run: SIGTERM/SIGINT save and stop, a corrupt newest checkpoint, a workdir of
another config, two processes on one workdir, unwritable places, a full disk."""

import errno
import json
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from grassjax.runlog import read_metrics_jsonl
from grassjax.train.workdir import WorkdirError, WorkdirLock, prepare_workdir
from tests.conftest import TINY_OVERRIDES
from tests.test_train import cli, overrides_as_flags, signal_after_first_loss, train_losses


def latest(workdir):
    from grassjax.train.checkpoint import Checkpointer

    return Checkpointer(workdir).latest_step()


# No statistics probe or images: these tests are about the workdir, not the model.
FAST = {**TINY_OVERRIDES, "stats.enabled": "False", "train.sample_tokens": "4"}


def fast_run(exp, workdir, data_dir, restart=False, **extra):
    import experiments

    overrides = {**FAST, **{k.replace("__", "."): str(v) for k, v in extra.items()}}
    return experiments.run(exp, overrides, workdir=str(workdir), data_dir=str(data_dir),
                                 wandb_mode="disabled", restart=restart)


def test_sigterm_saves_at_the_current_step_and_a_rerun_continues_bit_exactly(tmp_path, text_data_dir):
    """What Slurm/Kubernetes send on preemption: save at the current step, flush, exit 143 (128 + SIGTERM).
    (SIGINT takes the same path with 130: test_train.py's Ctrl-C test.)"""
    workdir, straight = tmp_path / "run", tmp_path / "straight"
    long = {**FAST, "train.steps": "100000", "train.eval_every": "100000", "train.checkpoint_every": "100000"}
    flags = ["--exp=bigram_shakespeare", f"--workdir={workdir}", f"--data_dir={text_data_dir}",
             "--wandb_mode=disabled", *overrides_as_flags(long)]
    done = signal_after_first_loss(flags, workdir, signal.SIGTERM)
    out, err, metrics = done.stdout, done.stderr, workdir / "metrics.jsonl"
    assert done.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "SIGTERM: stopping after this step" in out and "checkpoint saved at step" in out
    saved = latest(workdir)
    assert saved > 0 and saved >= max(r["step"] for r in read_metrics_jsonl(metrics))  # nothing logged is lost
    assert not (workdir / "lock").exists()
    # The rerun continues exactly as a run that was never stopped (same schedule: steps unchanged).
    more = {k.replace(".", "__"): v for k, v in long.items() if k.startswith("train.")}
    more["train__stop_after"] = saved + 4
    fast_run("bigram_shakespeare", workdir, text_data_dir, **more)
    fast_run("bigram_shakespeare", straight, text_data_dir, **more)
    assert train_losses(workdir) == train_losses(straight) and max(train_losses(workdir)) == saved + 4


def _truncate_checkpoint(workdir, step):
    for path in (workdir / "checkpoints" / str(step)).rglob("*"):
        if path.is_file():
            path.write_bytes(b"")


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, text_data_dir, capsys):
    workdir = tmp_path / "run"
    fast_run("bigram_shakespeare", workdir, text_data_dir, train__stop_after=20, train__checkpoint_every=10,
             train__steps=30)
    _truncate_checkpoint(workdir, 20)
    capsys.readouterr()
    result = fast_run("bigram_shakespeare", workdir, text_data_dir, train__checkpoint_every=10, train__steps=30)
    out = capsys.readouterr().out
    assert "Warning: checkpoint 20 is unreadable" in out and "resuming from step 10" in out
    assert result.final_step == 30
    assert len(list((workdir / "checkpoints-corrupt").iterdir())) == 1  # moved aside, not deleted
    # Every checkpoint unreadable: refuse (nothing moved) rather than silently start over.
    for step in (20, 30):
        _truncate_checkpoint(workdir, step)
    with pytest.raises(WorkdirError, match="no checkpoint .* can be restored.*--restart"):
        fast_run("bigram_shakespeare", workdir, text_data_dir, train__checkpoint_every=10, train__steps=30)


def test_a_workdir_of_another_config_is_refused_and_a_new_schedule_is_said(tmp_path, text_data_dir, capsys):
    workdir = tmp_path / "run"
    fast_run("grassmann_shakespeare", workdir, text_data_dir, train__stop_after=10)
    for change, message in [({"model__d_model": 16}, "model.d_model: 32 -> 16"),
                            ({"model__offsets": "1,3"}, "model.offsets: [1, 2, 4] -> [1, 3]"),
                            ({"train__seed": 1}, "train.seed: 0 -> 1")]:
        with pytest.raises(WorkdirError) as info:
            fast_run("grassmann_shakespeare", workdir, text_data_dir, **change)
        text = str(info.value)
        assert message in text and "--workdir" in text and "--restart" in text and "\n" not in text
    assert latest(workdir) == 10 and max(train_losses(workdir)) == 10  # untouched
    capsys.readouterr()
    fast_run("grassmann_shakespeare", workdir, text_data_dir, train__steps=24, train__stop_after=12)
    assert "Note: train.steps changed from 20 to 24 on resume" in capsys.readouterr().out


def test_other_experiment_is_one_line_and_restart_keeps_the_old_run(tmp_path, text_data_dir):
    workdir = tmp_path / "run"
    fast_run("grassmann_shakespeare", workdir, text_data_dir, train__stop_after=10)
    proc = cli("--exp=transformer_shakespeare", f"--workdir={workdir}", f"--data_dir={text_data_dir}",
               "--wandb_mode=disabled", *overrides_as_flags(FAST))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "model.mixer: 'grassmann' -> 'attention'" in lines[0], \
        proc.stderr[-2000:]
    result = fast_run("bigram_shakespeare", workdir, text_data_dir, restart=True, train__steps=4)
    assert result.final_step == 4
    previous = [p for p in tmp_path.iterdir() if p.name.startswith("run.previous-")]
    assert len(previous) == 1 and (previous[0] / "checkpoints" / "10").is_dir()  # the old run is kept whole
    assert json.loads((workdir / "run_config.json").read_text())["model"]["kind"] == "bigram"


def test_a_second_process_on_a_locked_workdir_gets_one_line(tmp_path, text_data_dir):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (workdir / "lock").write_text(f"{socket.gethostname()} {holder.pid}\n")
        with pytest.raises(WorkdirError, match=f"in use by process {holder.pid}"):
            fast_run("bigram_shakespeare", workdir, text_data_dir)
        assert not (workdir / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # Its owner is gone (kill -9 leaves the file): the next run takes the lock over, and releases it.
    fast_run("bigram_shakespeare", workdir, text_data_dir, train__stop_after=2)
    assert not (workdir / "lock").exists()
    with WorkdirLock(workdir), pytest.raises(WorkdirError, match="in use"):
        WorkdirLock(workdir).acquire()


def test_unwritable_workdirs_are_one_line(tmp_path, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    proc = cli("--exp=bigram_shakespeare", f"--workdir={a_file}", "--wandb_mode=disabled")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "is a file, not a folder" in lines[0], proc.stderr
    with pytest.raises(WorkdirError, match="is a file"):
        prepare_workdir(a_file / "sub")

    def denied(self, *args, **kwargs):  # tests may run as root, where chmod 555 does not stop a write
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", denied)
    with pytest.raises(WorkdirError, match="is not writable .Permission denied"):
        prepare_workdir(tmp_path / "ro")


def test_disk_full_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, text_data_dir, monkeypatch):
    import orbax.checkpoint as ocp

    from grassjax.runlog import RunLogger

    save = ocp.CheckpointManager.save

    def full_at_20(self, step, *args, **kwargs):
        if step == 20:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
        return save(self, step, *args, **kwargs)

    workdir = tmp_path / "run"
    monkeypatch.setattr(ocp.CheckpointManager, "save", full_at_20)
    with pytest.raises(WorkdirError, match="No space left on device.*last good checkpoint is step 10") as info:
        fast_run("bigram_shakespeare", workdir, text_data_dir)
    assert info.value.exit_code == 1 and latest(workdir) == 10
    monkeypatch.undo()

    log = RunLogger.log

    def full_metrics(self, metrics, step):
        if step >= 14:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.workdir / "metrics.jsonl"))
        return log(self, metrics, step)

    monkeypatch.setattr(RunLogger, "log", full_metrics)
    with pytest.raises(WorkdirError, match="at step 14 .No space left.*kept at step 10"):
        fast_run("bigram_shakespeare", workdir, text_data_dir)
    assert latest(workdir) == 10 and not (workdir / "lock").exists()
    monkeypatch.undo()

    def full_at_start(self, *args, **kwargs):  # the logger opens metrics.jsonl before the first step
        raise OSError(errno.ENOSPC, "No space left on device", str(workdir / "metrics.jsonl"))

    monkeypatch.setattr(RunLogger, "__init__", full_at_start)
    with pytest.raises(WorkdirError, match="cannot write in .*No space left on device"):
        fast_run("bigram_shakespeare", workdir, text_data_dir)
    assert latest(workdir) == 10 and not (workdir / "lock").exists()


def test_nan_before_the_first_checkpoint_says_so(tmp_path, text_data_dir):
    from grassjax.train.loop import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="no checkpoint had been saved yet"):
        fast_run("grassmann_shakespeare", tmp_path / "run", text_data_dir, train__learning_rate=1e30,
                 train__min_lr=1e30)


def test_help_header_names_every_config_section():
    out = cli("--help").stdout
    assert "sections: model, data, train, stats, wandb" in out
