"""Two real processes on localhost (jax.distributed, gloo collectives on CPU): one writer, same losses."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.test_guards import FAST, fast_run
from tests.test_train import cli, overrides_as_flags, train_losses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_in_step_with_one_writer(tmp_path, text_data_dir):
    workdir, single = tmp_path / "run", tmp_path / "single"
    port = free_port()
    flags = ["--exp=bigram_shakespeare", f"--workdir={workdir}", f"--data_dir={text_data_dir}", "--wandb_mode=disabled",
             *overrides_as_flags(FAST), f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             "--distributed_timeout=120"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, str(REPO / "launch.py"), *flags, f"--process_id={i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                              stdin=subprocess.DEVNULL) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    (out0, _), (out1, err1) = outs
    assert "step     20 | train" in out0 and "done: 20 steps" in out0
    assert out1.strip().splitlines() == [f"process 1 of 2: training in step with process 0, which prints and "
                                         f"writes {workdir}"], out1
    assert "Gloo" not in out0 + out1 and "Traceback" not in err1
    # One writer: no per-process folders, and metrics.jsonl holds one run's records, not two.
    assert not any(p.name.startswith("process") for p in workdir.iterdir())
    losses = train_losses(workdir)
    assert sorted(losses) == list(range(2, 21, 2))
    # The same global batch on one process gives the same losses (2 devices vs 1: up to reduction order).
    fast_run("bigram_shakespeare", single, text_data_dir)
    assert losses == pytest.approx(train_losses(single), rel=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--process_id=2"], "--process_id must be in [0, 1] for --num_processes=2, got 2"),
    (["--process_id=1", "--distributed_timeout=2"], "process 1: waited 2s for process 0 (nothing answers at"),
])
def test_bad_or_missing_peers_are_one_line(flags, message):
    proc = cli("--exp=bigram_shakespeare", f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2",
               *flags, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def start_two(flags, workdir, wait_for_checkpoint=False):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, str(REPO / "launch.py"), *flags, f"--workdir={workdir}",
                               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                               f"--process_id={i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=REPO, stdin=subprocess.DEVNULL) for i in range(2)]
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("train/loss") >= 3):
        time.sleep(0.1)
    while wait_for_checkpoint and time.time() < deadline and not (workdir / "checkpoints" / "50").is_dir():
        time.sleep(0.1)
    return procs


def finish(procs, timeout=120):
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outs = [p.communicate() for p in procs]
        pytest.fail(f"a process hung: {[o[1][-1500:] for o in outs]}")


def long_run_flags(text_data_dir, **extra):
    overrides = {**FAST, "train.steps": "1000000", "train.eval_every": "1000000",
                 "train.checkpoint_every": "50", **extra}
    return ["--exp=bigram_shakespeare", f"--data_dir={text_data_dir}", "--wandb_mode=disabled",
            "--distributed_timeout=30", *overrides_as_flags(overrides)]


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path, text_data_dir):
    """Preemption that signals one process first (or only one): every process must stop at the same step,
    or one waits in the collective save while the other waits in the next train step, forever."""
    workdir = tmp_path / "run"
    procs = start_two(long_run_flags(text_data_dir, **{"train.checkpoint_every": "1000000"}), workdir)
    procs[1].send_signal(signal.SIGTERM)
    (out0, err0), (out1, err1) = finish(procs)
    assert [p.returncode for p in procs] == [143, 143], (err0[-2000:], err1[-2000:])
    assert "process 1 got SIGTERM: stopping after this step" in out0 and "Traceback" not in err0 + err1
    saved = int(out0.split("checkpoint saved at step ")[1].split()[0])
    from grassjax.train.checkpoint import Checkpointer

    assert Checkpointer(workdir).all_steps() == [saved]  # one collective save, at one step


def test_a_peer_that_dies_is_one_line_naming_it(tmp_path, text_data_dir):
    workdir = tmp_path / "run"
    procs = start_two(long_run_flags(text_data_dir), workdir, wait_for_checkpoint=True)
    procs[1].kill()
    start = time.time()
    out0, err0 = procs[0].communicate(timeout=120)
    procs[1].wait()
    lines = err0.strip().splitlines()
    assert procs[0].returncode == 1 and len(lines) == 1, err0[-3000:]
    assert "process 0 lost contact with process 1 at step" in lines[0]
    assert "last good checkpoint kept at step" in lines[0] and "restart every process" in lines[0]
    assert time.time() - start < 60 and not (workdir / "lock").exists()
