"""RunLogger (W&B + plain files) and the offline run-file reader.

No credentials are visible to any test (see the `no_credentials` fixture), so
"auto" resolves to offline and nothing touches the network. W&B runs are
started only a handful of times; each costs about a second.
"""

import json
import math
import os
import pathlib
import pty
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

from grassjax.runlog import offline as wandb_offline
from grassjax.runlog import (WANDB_MODES, RunLogger, WandbCredentialsError, read_metrics_jsonl,
                             resolve_wandb_mode)

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_credentials(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_RUN_ID",
                 "WANDB_RESUME", "WANDB_SILENT"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-default"))


def make_logger(workdir, mode=None, lines=None, **kwargs):
    return RunLogger(workdir=workdir, project="grassjax-test", name="unit", group="tests", tags=["unit", "cpu"],
                     config={"model": {"d_model": 32}, "lr": 0.003}, mode=mode, job_type="test",
                     print_fn=(lines.append if lines is not None else print), **kwargs)


# ------------------------------------------------------------------------------------------- mode resolution
def test_auto_without_credentials_is_offline():
    assert resolve_wandb_mode(None) == ("offline", "no credentials found")
    assert resolve_wandb_mode("auto")[0] == "offline"
    with pytest.raises(WandbCredentialsError, match="WANDB_API_KEY"):
        resolve_wandb_mode("online")  # wandb would prompt for a login; refuse instead


@pytest.fixture
def local_wandb_server(monkeypatch):
    """WANDB_BASE_URL pointing at a local port that accepts connections (nothing is served)."""
    server = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    yield "127.0.0.1"
    server.close()


def test_auto_with_credentials_is_online(monkeypatch, local_wandb_server):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode(None) == ("online", "credentials from WANDB_API_KEY")
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = pathlib.Path(os.environ["NETRC"])
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    netrc.chmod(0o600)
    assert resolve_wandb_mode(None)[0] == "offline"  # an entry for another host than WANDB_BASE_URL's
    netrc.write_text(f"machine {local_wandb_server}\n  login user\n  password " + "k" * 40 + "\n")
    assert resolve_wandb_mode(None) == ("online", f"credentials from {netrc}")
    assert resolve_wandb_mode("online")[0] == "online"


def test_auto_with_credentials_but_no_server_is_offline(monkeypatch):
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: connection refused
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode(None) == ("offline", "credentials found but 127.0.0.1 is unreachable")
    assert resolve_wandb_mode("online")[0] == "online"  # an explicit request is not second-guessed


def test_explicit_modes_and_wandb_mode_env(monkeypatch):
    assert resolve_wandb_mode("offline")[0] == "offline"
    assert resolve_wandb_mode(" Disabled ")[0] == "disabled"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode(None) == ("disabled", "WANDB_MODE=disabled")
    assert resolve_wandb_mode("offline")[0] == "offline"  # an explicit mode beats the environment


@pytest.mark.parametrize("bad", ["dryrun", "on", ""])
def test_invalid_mode_lists_the_valid_ones(bad):
    with pytest.raises(ValueError) as info:
        resolve_wandb_mode(bad)
    message = str(info.value)
    assert "\n" not in message and repr(bad) in message
    assert all(mode in message for mode in WANDB_MODES)


# ------------------------------------------------------------------------------------------------ offline run
def test_offline_run_reaches_the_wandb_file_and_metrics_jsonl(tmp_path):
    import jax.numpy as jnp
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir, lines = tmp_path / "run", []
    steps = {
        10: {"train/loss": 2.5, "val/loss": 2.25, "train/lr": np.float32(1e-3), "tokens": np.int64(4096)},
        20: {"train/loss": jnp.float32(1.75), "val/loss": 1.5, "train/lr": 3e-4, "tokens": 8192},
        30: {"train/loss": 1.125, "val/loss": 1.625, "train/lr": float("nan"), "tokens": 12288},
    }
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    with make_logger(workdir, lines=lines) as logger:
        for step, metrics in steps.items():
            logger.log(metrics, step=step)
        logger.log_images({"maps/gate": np.linspace(0, 1, 24).reshape(4, 6), "curve": fig}, step=30, caption="c")
        logger.log_table("samples", ["step", "text"], [[30, "To be, or not"], [np.int64(31), "that is"]], step=30)
        logger.set_summary({"params/total": np.int64(1234), "long_text": "w" * 70_000})
        run_dir, run_file = logger.run_dir, logger.run_file
    plt.close(fig)
    logger.finish()  # idempotent

    # exactly one line, naming the run folder and how to upload it
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert lines[0].startswith("W&B offline (no credentials found): run saved in ")
    assert f"wandb sync {run_dir}" in lines[0]
    assert run_dir.is_dir() and run_dir.parent == workdir / "wandb" and run_dir.name.startswith("offline-run-")
    assert wandb_offline.find_run_file(workdir) == run_file and run_file.parent == run_dir

    expected = {step: {k: float(v) for k, v in m.items()} for step, m in steps.items()}

    # metrics.jsonl: every scalar, strict JSON (NaN spelled as a string), read back as floats
    raw = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw] == [10, 20, 30] and raw[2]["train/lr"] == "NaN"
    records = read_metrics_jsonl(workdir / "metrics.jsonl")
    for record in records:
        want = expected[record.pop("step")]
        assert record.keys() == want.keys()
        for key, value in want.items():
            assert record[key] == value or (math.isnan(value) and math.isnan(record[key])), key

    # W&B history: the same values, exactly, on the common "step" axis
    history = wandb_offline.read_history(run_file)
    scalar_rows = {int(h["step"]): h for h in history if "train/loss" in h}
    assert scalar_rows.keys() == expected.keys()
    for step, want in expected.items():
        for key, value in want.items():
            got = scalar_rows[step][key]
            assert got == value or (math.isnan(value) and math.isnan(got)), (step, key, got, value)
    logged = set().union(*history)
    assert {"maps/gate/_type", "curve/_type", "samples/_type"} <= logged
    media = {k: h[k] for h in history for k in ("maps/gate/_type", "curve/_type", "samples/_type", "step") if k in h}
    assert media == {"maps/gate/_type": "image-file", "curve/_type": "image-file", "samples/_type": "table-file",
                     "step": 30}
    assert wandb_offline.read_history(run_file, nested=True)[-1]["samples"]["nrows"] == 2

    summary = wandb_offline.read_summary(workdir, nested=True)
    assert summary["val/loss"] == {"min": 1.5, "last": 1.625}  # best and final val loss
    assert summary["params/total"] == 1234
    assert summary["long_text"] == "w" * 70_000  # a record split FIRST/MIDDLE/LAST across blocks

    info = wandb_offline.read_run_info(run_file)
    assert info["id"] == (workdir / "wandb_run_id").read_text().strip() == run_file.stem.removeprefix("run-")
    identity = (info["project"], info["name"], info["group"], info["job_type"])
    assert identity == ("grassjax-test", "unit", "tests", "test")
    assert info["tags"] == ["unit", "cpu"] and info["exit_code"] == 0
    assert info["config"] == {"model": {"d_model": 32}, "lr": 0.003}

    # the plain-file copies exist without W&B
    assert {p.name for p in (workdir / "images").iterdir()} == {"maps_gate_30.png", "curve_30.png"}
    tables = [json.loads(line) for line in (workdir / "tables.jsonl").read_text().splitlines()]
    assert tables == [{"step": 30, "table": "samples", "columns": ["step", "text"],
                       "rows": [[30, "To be, or not"], [31, "that is"]]}]
    assert json.loads((workdir / "summary.json").read_text())["params/total"] == 1234

    with pytest.raises(RuntimeError, match="finish"):
        logger.log({"train/loss": 1.0}, step=40)


def test_disabled_mode_writes_only_the_plain_files(tmp_path):
    workdir, lines = tmp_path / "run", []
    logger = make_logger(workdir, mode="disabled", lines=lines)
    logger.log({"train/loss": 3.0, "bad": float("-inf")}, step=1)
    logger.log({"train/loss": np.float64(2.0)}, step=2)
    logger.log_images({"gray": np.zeros((3, 3), np.uint8), "rgb": np.ones((2, 2, 3))}, step=2)
    logger.log_table("t", ["a"], [[1]], step=2)
    logger.set_summary({"x": 1})
    assert logger.run is None and logger.run_dir is None and logger.run_file is None
    logger.finish()
    assert lines == []
    assert read_metrics_jsonl(workdir / "metrics.jsonl") == [{"step": 1, "train/loss": 3.0, "bad": -math.inf},
                                                            {"step": 2, "train/loss": 2.0}]
    assert sorted(p.name for p in (workdir / "images").iterdir()) == ["gray_2.png", "rgb_2.png"]
    assert not (workdir / "wandb").exists() and not (workdir / "wandb_run_id").exists()
    assert not (tmp_path / "wandb-default").exists()
    with pytest.raises(FileNotFoundError):
        wandb_offline.find_run_file(workdir)


def test_log_rejects_non_scalars_and_the_step_key(tmp_path):
    with make_logger(tmp_path / "run", mode="disabled") as logger:
        with pytest.raises(TypeError, match="acts"):
            logger.log({"acts": np.zeros(3)}, step=0)
        with pytest.raises(ValueError, match="step"):
            logger.log({"step": 3}, step=3)
        logger.log({"one": np.ones((1, 1), np.float32)}, step=0)  # size-1 arrays are scalars
    assert read_metrics_jsonl(tmp_path / "run" / "metrics.jsonl") == [{"step": 0, "one": 1.0}]


def test_resume_reuses_the_run_id_and_appends(tmp_path):
    workdir = tmp_path / "run"
    with make_logger(workdir, mode="offline", lines=[]) as first:
        first.log({"train/loss": 3.0}, step=1)
        first.log({"train/loss": 2.0}, step=2)
    with make_logger(workdir, mode="offline", lines=[]) as second:  # e.g. restarted from a step-1 checkpoint
        second.log({"train/loss": 2.5}, step=2)
        second.log({"train/loss": 1.5}, step=3)
    assert second.run_id == first.run_id == (workdir / "wandb_run_id").read_text().strip()
    assert second.run_dir != first.run_dir  # each start has its own offline-run folder, same id
    assert [(r["step"], r["train/loss"]) for r in read_metrics_jsonl(workdir / "metrics.jsonl")] == [
        (1, 3.0), (2, 2.0), (2, 2.5), (3, 1.5)]
    assert wandb_offline.find_run_file(workdir) == second.run_file  # the newest
    steps = lambda f: [(h["step"], h["train/loss"]) for h in wandb_offline.read_history(f)]  # noqa: E731
    assert steps(first.run_file) == [(1, 3.0), (2, 2.0)]
    assert steps(second.run_file) == [(2, 2.5), (3, 1.5)]  # the repeated step 2 is kept, not dropped


# --------------------------------------------------------------------------------------------- no stdin reads
CHILD = """
import sys
from grassjax.runlog import offline as wandb_offline
from grassjax.runlog import RunLogger
with RunLogger(workdir=sys.argv[1], project="p", name="n", group=None, tags=[], config={}) as lg:
    lg.log({"train/loss": 1.25}, step=7)
print("MODE", lg.mode)
print("HISTORY", wandb_offline.read_history(sys.argv[1])[0]["train/loss"])
"""


def run_child(code: str, args: list[str], *, terminal: bool, timeout: float, stop_on: bytes | None = None):
    """Run python code with stdin either empty (/dev/null) or a terminal that never answers.

    Returns (returncode or None if it had to be killed, stdout, terminal output).
    On a terminal, wandb believes it may prompt; a prompt then blocks forever.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if not terminal:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            out, _ = proc.communicate(timeout=timeout)
            return proc.returncode, out.decode(errors="replace"), ""
        except subprocess.TimeoutExpired:
            proc.kill()
            return None, proc.communicate()[0].decode(errors="replace"), ""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=slave, stderr=slave,
                            stdout=subprocess.PIPE, cwd=REPO, env=env)
    os.close(slave)
    seen = bytearray()

    def drain():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out_chunks: list[bytes] = []
    out_reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    out_reader.start()
    deadline, returncode = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        returncode = proc.poll()
        if returncode is not None or (stop_on is not None and stop_on in seen):
            break
        time.sleep(0.05)
    if returncode is None:
        proc.kill()
        proc.wait()
    out_reader.join(5)
    reader.join(5)
    os.close(master)
    return returncode, b"".join(out_chunks).decode(errors="replace"), seen.decode(errors="replace")


@pytest.mark.parametrize("terminal", [False, True], ids=["stdin-devnull", "stdin-silent-terminal"])
def test_wandb_init_never_reads_stdin(tmp_path, terminal):
    workdir = tmp_path / "run"
    returncode, out, term = run_child(CHILD, [str(workdir)], terminal=terminal, timeout=120,
                                      stop_on=b"Enter your choice")
    assert returncode == 0, out + term
    assert "MODE offline" in out and "HISTORY 1.25" in out
    assert "W&B offline (no credentials found)" in out and "wandb sync" in out
    assert "Enter your choice" not in term + out


def test_the_silent_terminal_would_catch_a_login_prompt(tmp_path):
    """Control for the test above: plain wandb.init(mode="online") without credentials does prompt there."""
    code = ("import sys, wandb; wandb.init(project='p', dir=sys.argv[1], mode='online', "
            "settings=wandb.Settings(x_disable_stats=True)); print('INITIALISED')")
    (tmp_path / "w").mkdir()
    returncode, out, term = run_child(code, [str(tmp_path / "w")], terminal=True, timeout=60,
                                      stop_on=b"Enter your choice")
    assert returncode is None and "Enter your choice" in term, (returncode, out, term)


# -------------------------------------------------------------------------------------------- run-file reader
def write_log(path, payloads) -> bytes:
    """Frame payloads the way wandb-core does (header, 32 KiB blocks, zlib CRC of type + data)."""
    block, out = wandb_offline.BLOCK_SIZE, bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))
    for payload in payloads:
        rest, first = payload, True
        while True:
            left = block - len(out) % block
            if left < 7:
                out += bytes(left)
                continue
            chunk, rest = rest[:left - 7], rest[left - 7:]
            kind = (1 if not rest else 2) if first else (4 if not rest else 3)
            out += struct.pack("<IHB", zlib.crc32(chunk, zlib.crc32(bytes([kind]))), len(chunk), kind) + chunk
            first = False
            if not rest:
                break
    pathlib.Path(path).write_bytes(out)
    return bytes(out)


def test_reader_reassembles_fragments_and_skips_block_padding(tmp_path):
    path = tmp_path / "run-x.wandb"
    small, big = b"a" * 100, bytes(range(256)) * 300  # big spans three blocks: FIRST, MIDDLE, LAST
    after_big = (7 + 107 + 7 + len(big) + 7 * 2) % wandb_offline.BLOCK_SIZE
    filler = b"f" * (wandb_offline.BLOCK_SIZE - after_big - 7 - 3)  # leaves a 3-byte block tail: padding
    payloads = [small, big, filler, b"next block", b""]
    data = write_log(path, payloads)
    kinds = []
    pos = 7
    while pos < len(data):
        if wandb_offline.BLOCK_SIZE - pos % wandb_offline.BLOCK_SIZE < 7:
            pos += wandb_offline.BLOCK_SIZE - pos % wandb_offline.BLOCK_SIZE
            continue
        _, n, kind = struct.unpack_from("<IHB", data, pos)
        kinds.append(kind)
        pos += 7 + n
    assert kinds == [1, 2, 3, 4, 1, 1, 1]  # the framing under test really has fragments and a padded tail
    assert data[3 * wandb_offline.BLOCK_SIZE - 3:3 * wandb_offline.BLOCK_SIZE] == b"\0\0\0"
    assert list(wandb_offline.iter_raw_records(path)) == payloads

    # a run killed mid-write: the cut-off record is dropped, the rest still reads
    path.write_bytes(data[:-(7 + 3)])  # the empty last record gone, "next block" cut short
    assert list(wandb_offline.iter_raw_records(path)) == payloads[:3]
    # corruption and foreign files are errors
    corrupt = bytearray(data)
    corrupt[7 + 7 + 50] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(wandb_offline.RunFileError, match="CRC"):
        list(wandb_offline.iter_raw_records(path))
    assert list(wandb_offline.iter_raw_records(path, verify_crc=False))[0] != small
    path.write_bytes(b"LEVELDB" + data[7:])
    with pytest.raises(wandb_offline.RunFileError, match="not a W&B run file"):
        list(wandb_offline.iter_raw_records(path))


def test_online_with_a_key_but_a_silent_server_falls_back_to_offline_within_the_cap(tmp_path, monkeypatch,
                                                                                   local_wandb_server):
    """A server that accepts and never answers (no network, a proxy black hole): wandb alone waits 90 s."""
    from grassjax.runlog import logger as run_logger

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(run_logger, "WANDB_INIT_TIMEOUT_S", 3.0)
    lines = []
    start = time.monotonic()
    logger = make_logger(tmp_path / "run", mode="online", lines=lines)
    try:
        assert time.monotonic() - start < 30
        assert logger.mode == "offline"
        assert len(lines) == 1 and "online init failed within 3s" in lines[0] and "wandb sync " in lines[0], lines
        logger.log({"loss": 1.0}, step=1)
    finally:
        logger.finish()
    assert read_metrics_jsonl(tmp_path / "run" / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
    # The fallback keeps the run's id (a resumed run's parts sync into one run), every time.
    saved = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert logger.run_id == saved
    again = make_logger(tmp_path / "run", mode="online", lines=lines)
    try:
        assert again.mode == "offline" and again.run_id == saved
    finally:
        again.finish()


def test_the_printed_sync_command_survives_a_path_with_spaces(tmp_path):
    import shlex

    lines = []
    logger = make_logger(tmp_path / "my runs" / "run 1", mode="offline", lines=lines)
    try:
        command = lines[0].split("upload later with: ", 1)[1]
        assert shlex.split(command) == ["wandb", "sync", str(logger.run_dir)]
    finally:
        logger.finish()
