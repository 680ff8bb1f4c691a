"""Faults and refusals: a refused command changes nothing of the run it refused, reading a run writes
nothing but its eval file, and every fault is one line (no library tracebacks on the console)."""

import contextlib
import hashlib
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from grassjax import inference
from grassjax.train.workdir import WorkdirError
from tests.conftest import REPO, generated_text
from tests.test_guards import FAST, fast_run, latest
from tests.test_train import cli, overrides_as_flags, start_training


def snapshot(workdir: pathlib.Path) -> dict[str, str]:
    """Every file under workdir, by content."""
    return {p.relative_to(workdir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(workdir.rglob("*")) if p.is_file()}


def text_dir(root: pathlib.Path, text: str) -> pathlib.Path:
    folder = root / "tinyshakespeare"
    folder.mkdir(parents=True)
    (folder / "input.txt").write_text(text)
    return root


def flags_for(exp, workdir, data_dir, **extra):
    overrides = {**FAST, **{k.replace("__", "."): str(v) for k, v in extra.items()}}
    return [f"--exp={exp}", f"--workdir={workdir}", f"--data_dir={data_dir}", "--wandb_mode=disabled",
            *overrides_as_flags(overrides)]


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch.py: error: "), proc.stderr[-3000:]
    return lines[0]


def quiet_sample(workdir, **kwargs):
    return inference.sample_run(workdir, prompt="Th", num_tokens=8, write=lambda _: None,
                                print_fn=lambda *_: None, **kwargs)


def test_a_rerun_on_another_text_is_refused_and_changes_nothing(tmp_path, text_data_dir):
    workdir = tmp_path / "run"
    fast_run("grassmann_shakespeare", workdir, text_data_dir, train__stop_after=10)
    before = snapshot(workdir)
    text = generated_text()
    assert "X" not in text
    # "same_size" has as many characters: it would decode wrongly, silently; "same_chars" has the
    # very same ones (e and o swapped): it would decode right, and train on another text
    others = [("upper", text.upper()), ("same_size", text.replace("e", "X")),
              ("same_chars", text.translate(str.maketrans("eo", "oe")))]
    for name, other in others:
        data = text_dir(tmp_path / name, other)
        line = one_error_line(cli(*flags_for("grassmann_shakespeare", workdir, data)))
        assert "holds a run trained on another text" in line and "--data_dir" in line and "--restart" in line
        assert snapshot(workdir) == before
    assert len(quiet_sample(workdir)) == 1  # the run is whole


def test_a_run_saved_before_dense_layout_loads_as_it_was_and_names_the_flag_to_resume(tmp_path,
                                                                                    text_data_dir):
    """Runs saved before model.dense_layout existed hold (in, out) kernels and no such key."""
    import json

    workdir = tmp_path / "run"
    fast_run("transformer_shakespeare", workdir, text_data_dir, train__stop_after=10,
             model__dense_layout="in_out")
    config = json.loads((workdir / "run_config.json").read_text())
    del config["model"]["dense_layout"]
    (workdir / "run_config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    assert len(quiet_sample(workdir)) == 1  # samples as before
    before = snapshot(workdir)
    run = inference.load_run(workdir, print_fn=lambda *_: None)
    assert run.config.model.dense_layout == "in_out"
    assert run.model.blocks[0].ffn.up.kernel.shape == (32, 64)  # (in, out), as saved
    line = one_error_line(cli(*flags_for("transformer_shakespeare", workdir, text_data_dir)))
    assert "model.dense_layout: 'in_out' -> 'out_in'" in line
    assert "to resume it, pass --config.model.dense_layout=in_out" in line
    assert snapshot(workdir) == before
    fast_run("transformer_shakespeare", workdir, text_data_dir, train__stop_after=20,
             model__dense_layout="in_out")
    assert latest(workdir) == 20  # resumed as it was


def test_a_workdir_without_run_config_is_checked_against_its_checkpoints(tmp_path, text_data_dir):
    """Runs trained before run_config.json existed: a rerun with other settings must not adopt the run."""
    workdir = tmp_path / "run"
    fast_run("grassmann_shakespeare", workdir, text_data_dir, train__stop_after=10)
    (workdir / "run_config.json").unlink()
    before = snapshot(workdir)
    with pytest.raises(WorkdirError, match=r"holds a model of another shape \(.*saved .*32.* vs .*16.*"
                                           r"trained with another config.*--restart") as info:
        fast_run("grassmann_shakespeare", workdir, text_data_dir, model__d_model=16, model__d_ff=32)
    assert "\n" not in str(info.value) and snapshot(workdir) == before
    # The command that trained it still resumes it, and then writes the file that was missing.
    result = fast_run("grassmann_shakespeare", workdir, text_data_dir, train__stop_after=14)
    assert result.final_step == 14 and (workdir / "run_config.json").exists()
    assert len(quiet_sample(workdir)) == 1


@contextlib.contextmanager
def small_disk(path: pathlib.Path, size: str = "4m"):
    """A tmpfs of `size` at path (yields True), or False where this process may not mount one."""
    path.mkdir(parents=True)
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                                    str(path)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(disk: pathlib.Path, leave_bytes: int) -> None:
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_good_one(tmp_path, text_data_dir,
                                                                                monkeypatch):
    with small_disk(tmp_path / "disk") as mounted:
        workdir = tmp_path / "disk" / "run"
        if mounted:  # a real full disk: orbax raises ValueError("RESOURCE_EXHAUSTED"), its threads log
            assert cli(*flags_for("grassmann_shakespeare", workdir, text_data_dir, train__stop_after=10)
                       ).returncode == 0
            fill(tmp_path / "disk", leave_bytes=48 * 1024)  # room for the logs, not for a checkpoint
            proc = cli(*flags_for("grassmann_shakespeare", workdir, text_data_dir))
            line = one_error_line(proc)
            assert proc.returncode == 1, proc.stderr[-2000:]
        else:  # no mount here: orbax's error, raised where it would be
            import orbax.checkpoint as ocp

            fast_run("grassmann_shakespeare", workdir, text_data_dir, train__stop_after=10)
            save = ocp.CheckpointManager.save

            def full(self, step, *args, **kwargs):
                if step == 20:
                    raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "params" in OCDBT database at local file '
                                     f'"{self.directory}": No space left on device [os_error_code=\'28\']')
                return save(self, step, *args, **kwargs)

            monkeypatch.setattr(ocp.CheckpointManager, "save", full)
            with pytest.raises(WorkdirError) as info:
                fast_run("grassmann_shakespeare", workdir, text_data_dir)
            line = str(info.value)
        assert "No space left on device" in line and "last good checkpoint is step 10" in line, line
        assert latest(workdir) == 10 and not list(workdir.rglob("*orbax-checkpoint-tmp*"))
        assert not (workdir / "lock").exists()


def _truncate_arrays(checkpoint: pathlib.Path) -> None:
    for path in checkpoint.rglob("*"):
        if path.is_file() and path.parent.name == "d":  # the array chunks, not the metadata
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])


def test_a_truncated_newest_checkpoint_is_one_warning_line(tmp_path, text_data_dir):
    """Big enough arrays that tensorstore reads them concurrently: a failed read used to print asyncio's
    'Event loop is closed' tracebacks from every pending read."""
    workdir = tmp_path / "run"
    wide = dict(model__d_model=128, model__d_ff=512, train__steps=30)
    assert cli(*flags_for("grassmann_shakespeare", workdir, text_data_dir, train__stop_after=20, **wide)
               ).returncode == 0
    _truncate_arrays(workdir / "checkpoints" / "20")
    proc = cli(*flags_for("grassmann_shakespeare", workdir, text_data_dir, **wide))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout and "Event loop" not in proc.stderr, proc.stderr[-3000:]
    warnings = [l for l in proc.stdout.splitlines() if l.startswith("Warning: checkpoint 20 is unreadable")]
    assert len(warnings) == 1 and "resuming from step 10" in warnings[0]


def test_two_studies_on_one_workdir_leave_the_live_trial_alone(tmp_path, text_data_dir):
    import experiments
    from tests.test_tune import new_study

    workdir = tmp_path / "study"
    study = new_study(workdir)
    optuna = pytest.importorskip("optuna")
    from optuna.trial import TrialState

    live = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-4, 3e-2, log=True)})
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        import socket

        (workdir / "lock").write_text(f"{socket.gethostname()} {holder.pid}\n")  # the first study's process
        with pytest.raises(WorkdirError, match=f"in use by process {holder.pid}"):
            experiments.run("tune_shakespeare", {**FAST, "tune.n_trials": "1"}, workdir=str(workdir),
                            data_dir=str(text_data_dir), wandb_mode="disabled")
    finally:
        holder.kill()
        holder.wait()
    storage = f"sqlite:///{workdir / 'study.db'}"
    states = [t.state for t in optuna.load_study(study_name="tune_shakespeare", storage=storage).trials]
    assert states == [TrialState.RUNNING] and live.number == 0


@contextlib.contextmanager
def read_only(workdir: pathlib.Path):
    """workdir made read-only for this process: a read-only bind mount as root, chmod otherwise."""
    if os.geteuid() != 0:
        for p in [workdir, *workdir.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        try:
            yield
        finally:
            for p in [workdir, *workdir.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)
        return
    ok = subprocess.run(["mount", "--bind", str(workdir), str(workdir)], capture_output=True).returncode == 0
    ok = ok and subprocess.run(["mount", "-o", "remount,ro,bind", str(workdir)],
                               capture_output=True).returncode == 0
    if not ok:
        subprocess.run(["umount", "-l", str(workdir)], capture_output=True)
        pytest.skip("root without permission to mount: cannot make a read-only folder here")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(workdir)], capture_output=True)


def test_evaluate_and_sample_read_a_read_only_run(tmp_path, text_data_dir):
    workdir = tmp_path / "run"
    fast_run("grassmann_shakespeare", workdir, text_data_dir)
    before = snapshot(workdir)
    with read_only(workdir):
        with pytest.raises(OSError):
            (workdir / "probe").write_text("x")
        proc = cli("--exp=grassmann_shakespeare", f"--workdir={workdir}", f"--data_dir={text_data_dir}",
                   "--mode=evaluate")
        assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr[-3000:]
        out = proc.stdout.strip().splitlines()
        assert any(l.startswith("loss (nats/char)") for l in out)
        assert out[-1].startswith(f"could not write {workdir / 'eval-val.json'} (") and \
            out[-1].endswith("); the numbers above are complete"), out[-1]
        proc = cli("--exp=grassmann_shakespeare", f"--workdir={workdir}", "--mode=sample", "--num_tokens=8",
                   "--prompt=Th")
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "8 tokens in" in proc.stdout
    assert snapshot(workdir) == before


def test_an_unreadable_data_file_says_so(tmp_path, monkeypatch):
    data = text_dir(tmp_path / "data", generated_text())
    text = data / "tinyshakespeare" / "input.txt"
    text.chmod(0o000)
    if os.geteuid() != 0:
        line = one_error_line(cli(*flags_for("grassmann_shakespeare", tmp_path / "run", data)))
    else:  # root reads any file: the read fails where it would
        import errno

        from grassjax.data import DataError

        read = pathlib.Path.read_bytes

        def denied(self):
            if self == text:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return read(self)

        monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
        with pytest.raises(DataError) as info:
            fast_run("grassmann_shakespeare", tmp_path / "run", data)
        line = str(info.value)
    assert "could not be read" in line and f"Permission denied: {text}" in line, line
    assert "cannot write" not in line and "free space" not in line and "\n" not in line


def test_a_folder_where_the_text_should_be_is_one_line_and_downloads_nothing(tmp_path):
    (tmp_path / "data" / "tinyshakespeare" / "input.txt").mkdir(parents=True)
    line = one_error_line(cli(*flags_for("grassmann_shakespeare", tmp_path / "run", tmp_path / "data")))
    assert "input.txt is not a file" in line and "--data_dir" in line and "download" not in line
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file()]  # nothing written


@pytest.mark.parametrize("key, value", [("train.grad_clip", "nan"), ("train.learning_rate", "inf"),
                                        ("train.learning_rate", "nan"), ("model.dropout", "-inf")])
def test_non_finite_config_values_are_refused(key, value):
    import experiments
    from grassjax.train.config import ConfigError

    with pytest.raises(ConfigError, match=f"--config.{key}='{value}': expected a finite number"):
        experiments.resolve_config("grassmann_shakespeare", {key: value})


def test_non_finite_values_set_in_python_are_refused_too():
    from experiments.shakespeare import grassmann_shakespeare
    from grassjax.studies.arms import validate_comparison
    from grassjax.train.config import ConfigError

    config = grassmann_shakespeare()
    config.train.grad_clip = math.nan
    with pytest.raises(ConfigError, match="train.grad_clip=nan is not a finite number"):
        validate_comparison(config)


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -1.0])
def test_a_bad_sampling_temperature_is_one_line(tmp_path, temperature):
    with pytest.raises(inference.RunError, match=r"^--temperature must be a finite number >= 0"):
        inference.sample_run(tmp_path / "nothing", temperature=temperature)


def test_sigterm_twice_aborts_with_143_and_leaves_no_half_written_checkpoint(tmp_path, text_data_dir):
    """The second signal lands while the first's checkpoint is being written (a big model's save)."""
    workdir = tmp_path / "run"
    flags = flags_for("grassmann_shakespeare", workdir, text_data_dir, train__steps=100000,
                      train__eval_every=100000, train__checkpoint_every=100000, model__d_model=256,
                      model__d_ff=1024, model__num_layers=2)
    proc = start_training(flags, workdir)
    proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 120
    while time.time() < deadline and not list(workdir.rglob("*orbax-checkpoint-tmp*")):
        time.sleep(0.005)  # the save has begun
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert not list(workdir.rglob("*orbax-checkpoint-tmp*")) and not (workdir / "lock").exists()
