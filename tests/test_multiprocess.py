"""Two real processes on localhost (jax.distributed, gloo collectives on CPU): one writer, same losses."""

import os
import socket
import subprocess
import sys

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
