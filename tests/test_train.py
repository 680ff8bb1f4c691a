"""The training loop end to end: CLI, logging, resume, determinism, NaN stop, Ctrl-C, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

import experiments
from grassjax.runlog import read_metrics_jsonl
from tests.conftest import REPO, SHARED_DATA, TINY_OVERRIDES


def cli(*args, timeout=300, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL, cwd=REPO, **kwargs)


def overrides_as_flags(overrides):
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def run(exp, workdir, data_dir, wandb_mode="disabled", **extra):
    overrides = {**TINY_OVERRIDES, **{k.replace("__", "."): str(v) for k, v in extra.items()}}
    return experiments.run(exp, overrides, workdir=str(workdir), data_dir=str(data_dir), wandb_mode=wandb_mode)


def train_losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics_jsonl(workdir / "metrics.jsonl") if "train/loss" in r}


@pytest.mark.parametrize("lr, min_lr, warmup, steps", [(8e-3, 8e-4, 100, 2000), (1e-3, 1e-4, 100, 5000),
                                                       (1e-2, 1e-4, 2, 24), (3e-3, 1e-4, 0, 50)])
def test_the_schedule_as_data_gives_optaxs_floats_bit_for_bit(lr, min_lr, warmup, steps):
    """The learning rate is an argument of the compiled step now, not a constant in it; a run must still train
    on exactly the floats optax's constant schedule gave (so recorded results reproduce bit for bit)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from experiments.shakespeare import grassmann_shakespeare
    from grassjax.train.optim import hparams_schedule, train_hparams

    tc = grassmann_shakespeare().train
    tc.update(learning_rate=lr, min_lr=min_lr, warmup_steps=warmup, steps=steps)
    hp = train_hparams(tc)
    ours = jax.jit(lambda c, hp: hparams_schedule(hp)(c))  # hp traced, as in the train step
    theirs = jax.jit(optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, min_lr))
    counts = sorted({*range(0, 3 * max(warmup, 1) + 3), *range(0, steps + 5, max(1, steps // 50)), steps - 1})
    a = np.array([ours(jnp.int32(c), hp) for c in counts], np.float32)
    b = np.array([theirs(jnp.int32(c)) for c in counts], np.float32)
    np.testing.assert_array_equal(a, b)


def test_compile_cache_serves_the_next_run_at_another_learning_rate_and_seed(tmp_path, text_data_dir, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)  # the suite's own cache would win
    cache = tmp_path / "xla"
    args = ["--exp=grassmann_shakespeare", f"--data_dir={text_data_dir}", "--wandb_mode=disabled",
            f"--compile_cache={cache}", *overrides_as_flags({**TINY_OVERRIDES, "train.steps": "4",
                                                              "train.eval_every": "4"})]
    assert cli(*args, f"--workdir={tmp_path / 'a'}").returncode == 0
    first = set(os.listdir(cache))
    assert any(name.startswith("jit_train_step-") for name in first), sorted(first)
    # The optimizer's numbers and the seed are data to the step, not constants in it: the same program.
    proc = cli(*args, f"--workdir={tmp_path / 'b'}", "--config.train.learning_rate=3e-3", "--config.train.seed=5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not any(name.startswith("jit_train_step-") for name in set(os.listdir(cache)) - first)
    # A folder it cannot write: one line, and the command goes on.
    proc = cli("--exp=grassmann_shakespeare", "--print_config", "--compile_cache=/proc/no-such-dir")
    assert proc.returncode == 0 and "model:" in proc.stdout
    assert [l for l in proc.stderr.splitlines() if "compile cache" in l] == [
        "compile cache off: cannot write /proc/no-such-dir (No such file or directory); pass --compile_cache=DIR, "
        "or --compile_cache='' to silence this"]
    # A benchmark never touches the cache (its results time compilation), so it has nothing to say about it.
    proc = cli("--exp=benchmark_scaling", "--print_config", "--compile_cache=/proc/no-such-dir")
    assert proc.returncode == 0 and "compile cache" not in proc.stderr


def test_cli_end_to_end_offline_logs_everywhere(tmp_path, text_data_dir):
    workdir = tmp_path / "run"
    proc = cli("--exp=grassmann_shakespeare", f"--workdir={workdir}", f"--data_dir={text_data_dir}",
               "--wandb_mode=offline", *overrides_as_flags(TINY_OVERRIDES))
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline_lines = [l for l in proc.stdout.splitlines() if l.startswith("W&B offline")]
    assert len(offline_lines) == 1 and "wandb sync " in offline_lines[0]
    records = read_metrics_jsonl(workdir / "metrics.jsonl")
    keys = set().union(*records)
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/update_norm", "perf/tokens_per_s",
                "perf/step_time_ms", "perf/elapsed_s", "val/loss", "val/ppl", "val/bpc", "eval_train/loss",
                "grassmann/gate_mean/L0", "grassmann/plucker_norm_mean/L0", "grassmann/offset_share/L0/d4",
                "grassmann/zero_g_fraction/L0"}
    assert expected <= keys, expected - keys
    eval_seconds = {r["step"]: r["perf/eval_s"] for r in records if "perf/eval_s" in r}
    assert list(eval_seconds) == [10, 20] and all(s > 0 for s in eval_seconds.values())  # one per evaluation
    val = [r["val/loss"] for r in records if "val/loss" in r]
    first_train = next(r["train/loss"] for r in records if "train/loss" in r)
    assert val[-1] < first_train - 0.5  # it learns
    result = json.loads((workdir / "result.json").read_text())
    assert result["final_step"] == 20 and result["params"]["total"] > 0

    from grassjax.runlog import offline as wandb_offline

    history = wandb_offline.read_history(wandb_offline.find_run_file(workdir))
    logged = set().union(*history)
    assert expected <= logged, expected - logged
    by_step = {int(h["step"]): h for h in history if "val/loss" in h}
    assert by_step[20]["val/loss"] == pytest.approx(val[-1], rel=1e-6)
    # Training seconds: in every train and eval row of both copies, never decreasing; val plots against step here.
    elapsed = [r["perf/elapsed_s"] for r in records if "perf/elapsed_s" in r]
    assert len(elapsed) == 10 + 2 and elapsed == sorted(elapsed) and elapsed[0] > 0
    assert elapsed == [h["perf/elapsed_s"] for h in history if "perf/elapsed_s" in h]
    axes = {(r.metric.glob_name or r.metric.name): r.metric.step_metric for r in
            wandb_offline.iter_records(wandb_offline.find_run_file(workdir)) if r.WhichOneof("record_type") == "metric"}
    assert axes["val/loss"] == axes["*"] == "step" and "val/*" not in axes
    assert any(k.startswith("grassmann/gate_map") for k in logged)  # images reached W&B too


def test_resume_continues_the_loss_curve_exactly_and_runs_are_deterministic(tmp_path, text_data_dir):
    interrupted, straight = tmp_path / "a", tmp_path / "b"
    run("transformer_shakespeare", interrupted, text_data_dir, train__stop_after=6)
    assert sorted(train_losses(interrupted)) == [2, 4, 6]
    run("transformer_shakespeare", interrupted, text_data_dir)  # resumes at step 6
    run("transformer_shakespeare", straight, text_data_dir)
    resumed, reference = train_losses(interrupted), train_losses(straight)
    assert sorted(resumed) == sorted(reference) == list(range(2, 21, 2))
    assert resumed == reference  # bitwise: same data stream, dropout keys and optimizer state
    # val loss at the end matches too
    last_val = lambda w: [r["val/loss"] for r in read_metrics_jsonl(w / "metrics.jsonl") if "val/loss" in r][-1]
    assert last_val(interrupted) == last_val(straight)
    # A rerun of the finished run trains nothing, compiles no step, and keeps the timing its training measured
    # (not nan) and its sample.
    first = json.loads((straight / "result.json").read_text())
    again = run("transformer_shakespeare", straight, text_data_dir)
    assert again.final_step == first["final_step"] and again.best_val_loss == first["best_val_loss"]
    assert math.isfinite(again.step_time_ms) and again.step_time_ms == first["step_time_ms"]
    assert again.tokens_per_s == first["tokens_per_s"]
    assert (again.compile_time_s, again.sample) == (first["compile_time_s"], first["sample"])


def test_dropout_run_resumes_exactly(tmp_path, text_data_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    run("grassmann_shakespeare", a, text_data_dir, model__dropout=0.2, train__stop_after=4, train__steps=8)
    run("grassmann_shakespeare", a, text_data_dir, model__dropout=0.2, train__steps=8)
    run("grassmann_shakespeare", b, text_data_dir, model__dropout=0.2, train__steps=8)
    assert train_losses(a) == train_losses(b)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, text_data_dir):
    from grassjax.train.checkpoint import Checkpointer
    from grassjax.train.loop import NonFiniteLossError

    workdir = tmp_path / "run"
    run("grassmann_shakespeare", workdir, text_data_dir, train__stop_after=10)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint kept at step 10"):
        run("grassmann_shakespeare", workdir, text_data_dir, train__learning_rate=1e30, train__min_lr=1e30)
    assert Checkpointer(workdir).latest_step() == 10


def start_training(flags, workdir) -> subprocess.Popen:
    """Start launch.py with `flags`; return once a training loss reached metrics.jsonl (or 120 s)."""
    proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and "train/loss" in metrics.read_text()):
        time.sleep(0.05)
    return proc


def signal_after_first_loss(flags, workdir, sig) -> subprocess.CompletedProcess:
    """Start launch.py with `flags`, send `sig` once a training loss reached metrics.jsonl, wait for the exit."""
    proc = start_training(flags, workdir)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_saves_a_checkpoint_and_a_rerun_resumes(tmp_path, text_data_dir):
    workdir = tmp_path / "run"
    flags = ["--exp=bigram_shakespeare", f"--workdir={workdir}", f"--data_dir={text_data_dir}", "--wandb_mode=disabled",
             *overrides_as_flags({**TINY_OVERRIDES, "train.steps": "1000000", "train.eval_every": "1000000"})]
    done = signal_after_first_loss(flags, workdir, signal.SIGINT)
    out, err = done.stdout, done.stderr
    assert done.returncode == 130, err[-2000:]
    assert "checkpoint saved at step" in out and "Traceback" not in err
    from grassjax.train.checkpoint import Checkpointer

    saved = Checkpointer(workdir).latest_step()
    assert saved and saved > 0
    # The rerun picks up where it stopped.
    proc = cli(*[f for f in flags if not f.startswith("--config.train.steps")], f"--config.train.steps={saved + 4}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"Resuming from step {saved}" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--exp=grassman_shakespeare"], "grassmann_shakespeare, grassmann_shakespeare_gpu"),
    (["--exp=grassmann_shakespeare", "--config.train.stepz=5"], "unknown key; valid keys here:"),
    (["--exp=grassmann_shakespeare", "--config.train.steps=many"], "expected an integer"),
    (["--exp=grassmann_shakespeare", "--config.model.num_heads=3"], "divisible"),
    (["--exp=grassmann_shakespeare", "--config.train.steps"], "needs a value"),
    (["--exp=grassmann_shakespeare", "--wandb_mode=maybe"], "wandb_mode"),
    (["--exp=grassmann_shakespeare", "--reuse_host_memory=maybe"], "--reuse_host_memory=maybe: ('Non-boolean"),
])
def test_bad_input_is_one_clear_line(args, message):
    proc = cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_missing_dataset_offline_explains_how_to_point_at_a_local_copy(tmp_path):
    proc = cli("--exp=bigram_shakespeare", f"--data_dir={tmp_path / 'empty'}", "--wandb_mode=disabled",
               "--config.train.steps=1")
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "--data_dir" in line and "GRASSJAX_DATA_DIR" in line


def test_wrong_checksum_is_refused_without_the_flag(text_data_dir, tmp_path):
    proc = cli("--exp=bigram_shakespeare", f"--data_dir={text_data_dir}", "--wandb_mode=disabled")
    assert proc.returncode == 2 and "allow_custom_text" in proc.stderr and "Traceback" not in proc.stderr


def test_list_prints_one_line_per_experiment():
    import experiments

    proc = cli("--list")
    assert proc.returncode == 0
    assert len(proc.stdout.strip().splitlines()) == len(experiments.EXPERIMENTS)


@pytest.mark.skipif(not (SHARED_DATA / "tinyshakespeare" / "input.txt").exists(), reason="no ../shared/data here")
def test_bigram_on_real_tiny_shakespeare_reaches_val_loss_below_2_6(tmp_path):
    result = experiments.run("bigram_shakespeare", {"train.steps": "300", "train.eval_every": "300",
                                                          "train.eval_batches": "10"},
                                   workdir=str(tmp_path / "run"), data_dir=str(SHARED_DATA), wandb_mode="disabled")
    assert result.best_val_loss < 2.6


def test_rewind_metrics_drops_records_past_the_checkpoint(tmp_path):
    from grassjax.runlog import rewind_metrics

    path = tmp_path / "metrics.jsonl"
    records = [{"step": 2, "train/loss": 3.0}, {"step": 4, "val/loss": 2.5}, {"step": 4, "attn/entropy/L0": 0.7},
               {"step": 4, "histogram": "grassmann/gate_hist/L0", "counts": [1], "edges": [0, 1]},
               {"step": 6, "train/loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    kept = rewind_metrics(path, 4)
    assert kept == [{"step": 2, "train/loss": 3.0}, {"step": 4, "val/loss": 2.5, "attn/entropy/L0": 0.7}]
    assert len(path.read_text().splitlines()) == 4 and '"step": 6' not in path.read_text()
