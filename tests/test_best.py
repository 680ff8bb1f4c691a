"""The best checkpoint: kept beside the rolling ones, used by default by the commands that use a run, and
safe against a kill during its write and against corruption."""

import os
import shutil
import subprocess
import sys

import pytest

from grassjax import inference
from grassjax.runlog import read_metrics_jsonl
from grassjax.train.checkpoint import BEST_DIR, Checkpointer
from tests.conftest import REPO
from tests.test_guards import FAST, fast_run
from tests.test_train import cli, overrides_as_flags

# The learning rate ramps up to 0.8 over the run (warmup past its end): the val loss falls at first, then
# rises well above its minimum, as an overfitting or diverging run's does.
RISING = dict(train__steps=40, train__learning_rate=2.0, train__min_lr=0.0, train__warmup_steps=100,
              train__eval_every=5, train__checkpoint_every=5, train__keep_checkpoints=2)


def val_losses(workdir) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in read_metrics_jsonl(workdir / "metrics.jsonl") if "val/loss" in r}


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def rising_run(tmp_path_factory):
    from tests.conftest import generated_text

    root = tmp_path_factory.mktemp("best")
    (root / "data" / "tinyshakespeare").mkdir(parents=True)
    (root / "data" / "tinyshakespeare" / "input.txt").write_text(generated_text())
    fast_run("grassmann_shakespeare", root / "run", root / "data", **RISING)
    return root / "run", root / "data"


def test_the_lowest_val_loss_is_kept_and_outlives_the_rolling_checkpoints(rising_run):
    workdir, _ = rising_run
    losses = val_losses(workdir)
    best_step = min(losses, key=losses.get)
    assert losses[40] > losses[best_step] + 0.5 and best_step < 30, losses  # it rose after its minimum
    checkpointer = Checkpointer(workdir, read_only=True)
    assert checkpointer.all_steps() == [35, 40]  # the rolling ones: the newest two
    assert checkpointer.best_step() == best_step and checkpointer.best_val_loss() == losses[best_step]
    assert [p.name for p in (workdir / BEST_DIR).iterdir()] == [str(best_step)]  # one best, no leftovers


def test_evaluate_uses_the_best_by_default_and_says_so(rising_run):
    workdir, data = rising_run
    best_step = Checkpointer(workdir, read_only=True).best_step()
    proc = cli("--exp=grassmann_shakespeare", f"--workdir={workdir}", f"--data_dir={data}", "--mode=evaluate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    used = [l for l in proc.stdout.splitlines() if "using step" in l]
    assert used == [f"{workdir}: using step {best_step}, the best checkpoint: val loss "
                    f"{val_losses(workdir)[best_step]:.4f}, the lowest of the run's evaluations on sampled "
                    f"validation batches"]
    best = inference.evaluate_run(workdir, data_dir=str(data), print_fn=quiet)
    latest = inference.evaluate_run(workdir, data_dir=str(data), checkpoint="latest", print_fn=quiet)
    assert (best["step"], best["checkpoint"]) == (best_step, "best")
    assert (latest["step"], latest["checkpoint"]) == (40, "latest")
    assert best["loss"] < latest["loss"]  # the kept model is the better one, over the whole split too
    assert (workdir / "eval-val.json").exists() and (workdir / "eval-val-latest.json").exists()
    assert inference.load_run(workdir, quiet, checkpoint=35).step == 35


@pytest.mark.parametrize("choice, message", [
    ("15", r"--checkpoint=15: .* has no checkpoint of step 15; available: latest \(step 40\); best \(step \d+\); "
           r"steps 35, 40"),
    ("newest", "--checkpoint='newest': expected best, latest or a step number"),
])
def test_a_missing_or_bad_choice_names_what_exists(rising_run, choice, message):
    workdir, _ = rising_run
    proc = cli("--exp=grassmann_shakespeare", f"--workdir={workdir}", "--mode=sample", f"--checkpoint={choice}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert __import__("re").search(message, lines[0]), lines[0]


def test_a_run_without_a_best_says_so(tmp_path, text_data_dir):
    workdir = tmp_path / "run"
    fast_run("grassmann_shakespeare", workdir, text_data_dir, train__stop_after=4, train__checkpoint_every=2)
    shutil.rmtree(workdir / BEST_DIR)  # as a run trained before best checkpoints were kept
    with pytest.raises(inference.RunError, match=r"--checkpoint=best: .* has no best checkpoint .*available: "
                                                 r"latest \(step 4\); steps 2, 4"):
        inference.load_run(workdir, quiet, checkpoint="best")
    lines = []
    assert inference.load_run(workdir, lines.append).step == 4
    assert lines == [f"{workdir}: using step 4, the newest checkpoint (the run has no readable best)"]


KILL_DURING_BEST_WRITE = """
import os, runpy, signal, sys
from orbax.checkpoint._src.path import atomicity

finalize = atomicity.AtomicRenameTemporaryPath.finalize
seen = []

async def killed(self, *args, **kwargs):  # the second best's files are written, not yet renamed
    if self._final_path.parent.name == "checkpoints-best":  # a step folder, not an item inside one
        seen.append(self._final_path)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = killed
sys.argv = ["launch.py"] + sys.argv[1:]
runpy.run_path("launch.py", run_name="__main__")
"""


def test_a_kill_during_the_best_write_keeps_the_previous_best(tmp_path, text_data_dir):
    workdir = tmp_path / "run"
    flags = [f"--exp=grassmann_shakespeare", f"--workdir={workdir}", f"--data_dir={text_data_dir}",
             "--wandb_mode=disabled", *overrides_as_flags({**FAST, **{k.replace("__", "."): str(v)
                                                                        for k, v in RISING.items()}})]
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_BEST_WRITE, *flags], capture_output=True,
                          text=True, cwd=REPO, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert any(".orbax-checkpoint-tmp" in p.name for p in (workdir / BEST_DIR).iterdir())  # half-written
    assert Checkpointer(workdir, read_only=True).best_step() == 5  # the previous best, whole
    lines = []
    run = inference.load_run(workdir, lines.append)
    assert run.step == 5 and run.choice == "best"
    # The rerun removes the half-written one, recomputes the steps since the last rolling checkpoint and
    # keeps the same best as a run that was never killed.
    fast_run("grassmann_shakespeare", workdir, text_data_dir, **RISING)
    fast_run("grassmann_shakespeare", tmp_path / "straight", text_data_dir, **RISING)
    assert not any(".orbax-checkpoint-tmp" in p.name for p in (workdir / BEST_DIR).iterdir())
    assert val_losses(workdir) == val_losses(tmp_path / "straight")
    assert Checkpointer(workdir).best_step() == Checkpointer(tmp_path / "straight").best_step()


def _truncate(folder):
    for path in folder.rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[:7])


def test_a_corrupt_best_is_said_and_the_newest_used(tmp_path, text_data_dir):
    workdir = tmp_path / "run"
    fast_run("grassmann_shakespeare", workdir, text_data_dir, **{**RISING, "train__stop_after": 20})
    best = Checkpointer(workdir).best_step()
    _truncate(workdir / BEST_DIR / str(best))
    lines = []
    run = inference.load_run(workdir, lines.append)
    assert run.step == 20 and run.choice == "latest"
    assert lines[0].startswith(f"Warning: the best checkpoint (step {best}) cannot be read (")
    assert lines[0].endswith("); using the newest instead") and len(lines) == 2
    with pytest.raises(inference.RunError, match=rf"--checkpoint=best: the best checkpoint \(step {best}\) "
                                                 r"cannot be read .*available: latest \(step 20\)"):
        inference.load_run(workdir, quiet, checkpoint="best")
    # Resuming training moves it aside, says so, and the next improvement saves a new best.
    out = []
    from grassjax.train.loop import train
    import experiments

    _, config = experiments.resolve_config("grassmann_shakespeare", {
        **FAST, **{k.replace("__", "."): str(v) for k, v in RISING.items()}, "train.learning_rate": "1e-2",
        "train.min_lr": "1e-3"})
    train(config, workdir=workdir, data_dir=str(text_data_dir), wandb_mode="disabled", print_fn=out.append)
    assert any(l.startswith(f"Warning: the best checkpoint (step {best})") and "moved to" in l for l in out), out
    assert Checkpointer(workdir).best_step() > 20
    assert any(p.name.startswith(f"best-{best}-") for p in (workdir / "checkpoints-corrupt").iterdir())


def test_a_comparison_reports_the_best_and_the_final_model_of_each_arm(tmp_path, text_data_dir):
    import experiments

    overrides = {**FAST, **{k.replace("__", "."): str(v) for k, v in RISING.items()}, "compare.seeds": "1",
                 "compare.ngram_contexts": "()"}
    result = experiments.run("compare_shakespeare", overrides, workdir=str(tmp_path / "cmp"),
                             data_dir=str(text_data_dir), wandb_mode="disabled")
    report = (tmp_path / "cmp" / "report" / "report.md").read_text()
    assert "the best was selected on the validation batches" in report and "**Overfitting.**" in report
    for row in result["rows"]:
        run_dir = tmp_path / "cmp" / row["arm"] / "seed0"
        losses = val_losses(run_dir)
        assert row["checkpoint_step"] == min(losses, key=losses.get) < 40 and row["steps"] == 40
        assert row["val_loss"] < row["final_val_loss"]  # the kept model, and what overfitting cost
        assert f"| {row['val_loss']:.4f} ± 0.0000 | {row['checkpoint_step']:,.0f} |" in report
        assert f"| {row['final_val_loss']:.4f} ± 0.0000 | 40 |" in report
    import json

    rows = json.loads((tmp_path / "cmp" / "report" / "summary.json").read_text())["rows"]
    base = next(r for r in rows if r["arm"] == "transformer")["val_loss"]
    grass = next(r for r in rows if r["arm"] == "grassmann")
    assert grass["delta_loss"] == pytest.approx(grass["val_loss"] - base)  # gaps on the best checkpoints


def test_the_best_and_the_final_checkpoint_reach_wandb_as_model_artifacts(tmp_path, text_data_dir,
                                                                          capfd):
    from grassjax.runlog import offline

    workdir = tmp_path / "run"
    run = lambda **extra: experiments_run(workdir, text_data_dir, **extra)  # noqa: E731
    run()
    assert "artifact" not in capfd.readouterr().err  # W&B's own lines stay off the console
    best = Checkpointer(workdir, read_only=True).best_step()
    models = [a for a in offline.read_artifacts(workdir) if a["type"] == "model"]
    run_id = (workdir / "wandb_run_id").read_text().strip()
    # The best first: W&B gives each version it logs "latest" too, and moves it to the last one.
    assert [(a["name"], a["metadata"]["step"]) for a in models] == [(f"model-{run_id}", best),
                                                                   (f"model-{run_id}", 40)]
    assert "best" in models[0]["aliases"] and models[1]["aliases"] == ["latest"]
    assert models[0]["metadata"]["val_loss"] == val_losses(workdir)[best]
    for model in models:
        assert {"run_config.json", "vocab.json"} <= set(model["files"])
        assert any(f.startswith("checkpoint/") for f in model["files"])
    # Turned off: the run logs none.
    other = tmp_path / "off"
    experiments_run(other, text_data_dir, wandb__log_checkpoints=False)
    assert not [a for a in offline.read_artifacts(other) if a["type"] == "model"]


def experiments_run(workdir, data_dir, **extra):
    import experiments

    overrides = {**FAST, **{k.replace("__", "."): str(v) for k, v in {**RISING, **extra}.items()}}
    return experiments.run("grassmann_shakespeare", overrides, workdir=str(workdir), data_dir=str(data_dir),
                           wandb_mode="offline")
