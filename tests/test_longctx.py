"""Matching arms by time and by tokens, the training clock (perf/elapsed_s), and the long-context study's report."""

import dataclasses
import json
import math

import pytest

import experiments
from grassjax.runlog import offline as wandb_offline
from grassjax.studies import longctx, matching
from grassjax.studies.arms import ArmSpec
from grassjax.studies.arms import validate_comparison as validate
from grassjax.train.config import ConfigError, apply_overrides, default_config
from grassjax.train.optim import hparams_schedule, train_hparams
from grassjax.runlog import read_metrics_jsonl
from tests.test_train import run


def fake_timer(seconds_per_step):
    calls = []

    def timer(cfg, data_dir, *, steps):
        calls.append(cfg.data.block_size)
        return {"s_per_step": seconds_per_step, "runs_s_per_step": [seconds_per_step] * 3, "timed_steps": 3 * steps,
                "compile_s": 0.5}

    timer.calls = calls
    return timer


def test_time_budget_fixes_the_step_count_and_a_resumed_comparison_keeps_it(tmp_path, text_data_dir, monkeypatch):
    workdir = tmp_path / "cmp"
    timer = fake_timer(0.05)  # 1.2 s / 50 ms = 24 steps (not the shared train.steps = 20)
    monkeypatch.setattr(matching, "time_train_step", timer)
    flags = dict(compare__seeds=1, compare__match="time", compare__time_budget_s=1.2, stats__enabled=False)
    run("compare_shakespeare", workdir, text_data_dir, wandb_mode="offline", train__stop_after=6, **flags)
    assert timer.calls == [32, 32]  # each arm timed once, before any trains
    for arm in ("grassmann", "transformer"):
        record = json.loads((workdir / arm / "steps.json").read_text())
        assert (record["steps"], record["ms_per_step"], record["for"]["time_budget_s"]) == (24, 50.0, 1.2)
        assert json.loads((workdir / arm / "seed0" / "run_config.json").read_text())["train"]["steps"] == 24
        assert json.loads((workdir / arm / "seed0" / "result.json").read_text())["final_step"] == 6  # interrupted

    # Rerun: a new estimate would give 12 steps, but the recorded count is kept and nothing is re-timed.
    retimer = fake_timer(0.1)
    monkeypatch.setattr(matching, "time_train_step", retimer)
    result = run("compare_shakespeare", workdir, text_data_dir, wandb_mode="offline", **flags)
    assert retimer.calls == [] and result["plans"]["grassmann"]["steps"] == 24
    assert {r["arm"]: r["steps"] for r in result["rows"]} == {"grassmann": 24, "transformer": 24}
    run_dir = workdir / "grassmann" / "seed0"
    records = read_metrics_jsonl(run_dir / "metrics.jsonl")
    lr = {r["step"]: r["train/lr"] for r in records if "train/lr" in r}
    tc = default_config().train
    tc.update(learning_rate=1e-2, min_lr=1e-4, warmup_steps=2, steps=24)
    schedule = hparams_schedule(train_hparams(tc))
    assert sorted(lr) == list(range(2, 25, 2)) and lr[24] == pytest.approx(float(schedule(23)))  # one whole cosine
    # perf/elapsed_s: in the train rows and the eval rows, non-decreasing across the resume, in both copies.
    elapsed = [(r["step"], r["perf/elapsed_s"]) for r in records if "perf/elapsed_s" in r]
    assert {s for s, _ in elapsed} >= {6, 10, 20, 24} and elapsed[-1][1] > 0
    assert all(a <= b for (_, a), (_, b) in zip(elapsed, elapsed[1:]))
    assert all("perf/elapsed_s" in r for r in records if "val/loss" in r)
    assert json.loads((run_dir / "result.json").read_text())["train_time_s"] == pytest.approx(elapsed[-1][1], abs=0.01)
    history = wandb_offline.read_history(run_dir)  # the resumed run's file: steps 6 to 24
    logged = [(int(h["step"]), h["perf/elapsed_s"]) for h in history if "perf/elapsed_s" in h]
    assert [x for x in elapsed if x[0] > 6] == [x for x in logged if x[0] > 6]
    # ... and W&B plots the eval losses against it (time-matched runs), summary min of val/loss included.
    metrics = [r.metric for r in wandb_offline.iter_records(wandb_offline.find_run_file(run_dir))
               if r.WhichOneof("record_type") == "metric"]
    axes = {(m.glob_name or m.name): m.step_metric for m in metrics}
    assert axes["val/*"] == axes["val/loss"] == "perf/elapsed_s" and axes["*"] == "step"

    with pytest.raises(matching.StepRecordError, match="time_budget_s differ"):
        run("compare_shakespeare", workdir, text_data_dir, **{**flags, "compare__time_budget_s": 2.0})


def test_tokens_matching_gives_every_arm_the_same_tokens(tmp_path, text_data_dir, monkeypatch):
    # The shared config: 6 steps x 8 rows x 32 = 1536 tokens. Block 16 at batch 8 needs 12 steps, block 32 with
    # batch 16 (the transformer arm's own train setting) needs 3.
    experiment = experiments.get_experiment("compare_shakespeare")
    cfg = experiment.get_config()
    cfg.arms.transformer.train = {"batch_size": 16}
    monkeypatch.setitem(experiments.EXPERIMENTS, experiment.name, dataclasses.replace(experiment, get_config=lambda: cfg))
    result = run("compare_shakespeare", tmp_path / "cmp", text_data_dir, compare__seeds=1, compare__match="tokens",
                 compare__blocks="16,32", train__steps=6, train__eval_every=100, stats__enabled=False)
    rows = {r["run"]: r for r in result["rows"]}
    assert {name: r["steps"] for name, r in rows.items()} == \
        {"grassmann_b16": 12, "transformer_b16": 6, "grassmann_b32": 6, "transformer_b32": 3}
    assert {r["tokens"] for r in rows.values()} == {1536}


def _row(arm, block, loss, std=0.01, seeds=3):
    return dict(arm=f"{arm}_b{block}", val_loss=loss, val_loss_std=std, seeds=seeds)


def _specs(blocks):
    return [ArmSpec(f"{arm}_b{b}", arm, b, {"train": {"batch_size": 3072 // b}})
            for b in blocks for arm in ("grassmann", "transformer")]


@pytest.mark.parametrize("losses, expected", [
    ({256: (2.0, 1.9), 512: (1.95, 1.96), 1024: (1.9, 2.0)}, 512),  # behind, then ahead from 512
    ({256: (2.0, 1.9), 512: (2.0, 1.95), 1024: (1.99, 1.98)}, None),  # never ahead
    ({256: (1.8, 1.9), 512: (1.95, 1.9), 1024: (1.8, 1.9)}, 256),  # ahead at 256, behind at 512, ahead again
])
def test_smallest_block_where_the_grassmann_arm_is_ahead(losses, expected):
    specs = _specs(losses)
    rows = longctx.block_rows([_row(a, b, l) for b, (g, t) in losses.items() for a, l in (("grassmann", g),
                                                                                       ("transformer", t))],
                              specs, "transformer")
    assert longctx.smallest_block_ahead(rows, "grassmann") == expected
    sentence = longctx.verdict(rows, "grassmann", "transformer")
    if expected is None:
        assert "is not ahead of `transformer` at equal training time at any block size up to 1024" in sentence
        assert "+0.0100 ± 0.0082 nats at block 1024" in sentence  # the closest it came
    else:
        assert f"is **{expected}**" in sentence
    by = {(r["arm"], r["block"]): r for r in rows}
    assert by["grassmann", 1024]["delta_loss"] == pytest.approx(losses[1024][0] - losses[1024][1])
    assert by["grassmann", 1024]["ppl_ratio"] == pytest.approx(math.exp(losses[1024][0] - losses[1024][1]))
    assert by["grassmann", 256]["delta_se"] == pytest.approx(math.sqrt(2 * 0.01 ** 2 / 3))
    assert by["grassmann", 512]["batch"] == 6 and by["transformer", 512]["delta_loss"] == 0
    if losses[512] == (1.95, 1.9):
        assert "behind again at: 512" in sentence


def test_tiny_longctx_study_end_to_end(tmp_path, text_data_dir):
    workdir = tmp_path / "longctx"
    result = run("longctx_shakespeare", workdir, text_data_dir, wandb_mode="offline", compare__seeds=1,
                 compare__blocks="32,64", compare__tokens_per_step=256, compare__time_budget_s=0.05,
                 compare__time_probe_steps=2, compare__evals_per_run=2)
    report = (workdir / "report" / "report.md").read_text()
    summary = json.loads((workdir / "report" / "summary.json").read_text())
    assert (workdir / "report" / "val_loss_time.png").stat().st_size > 10_000
    assert "### Block 32" in report and "### Block 64" in report and result["verdicts"][0] in report
    assert summary["blocks"] == [32, 64] and summary["time_budget_s"] == 0.05
    rows = {(r["arm"], r["block"]): r for r in summary["rows"]}
    assert rows["grassmann", 64]["batch"] == 4 and rows["transformer", 32]["batch"] == 8
    for (arm, block), row in rows.items():  # every number from the run's own files
        run_dir = workdir / f"{arm}_b{block}" / "seed0"
        assert row["val_loss"] == json.loads((run_dir / "eval-val.json").read_text())["loss"]
        assert row["steps"] == json.loads((workdir / f"{arm}_b{block}" / "steps.json").read_text())["steps"]
        config = json.loads((run_dir / "run_config.json").read_text())
        assert (config["data"]["block_size"], config["model"]["mixer"]) == \
            (block, "grassmann" if arm == "grassmann" else "attention")
    grassmann = json.loads((workdir / "grassmann_b32" / "seed0" / "run_config.json").read_text())["model"]
    assert grassmann["grassmann_partner_mix"] == "per_offset"
    delta = rows["grassmann", 64]["val_loss"] - rows["transformer", 64]["val_loss"]
    assert rows["grassmann", 64]["delta_loss"] == pytest.approx(delta)
    groups = {wandb_offline.read_run_info(workdir / name / "seed0")["group"] for name in
              ("grassmann_b32", "transformer_b32", "grassmann_b64", "transformer_b64")}
    assert groups == {wandb_offline.read_run_info(workdir / "report")["group"]} == {"longctx_shakespeare"}


def test_comparison_config_checks():
    cfg = experiments.get_experiment("longctx_shakespeare").get_config()
    validate(cfg)
    assert cfg.compare.match == "time" and tuple(cfg.compare.blocks) == (256, 512, 1024)
    with pytest.raises(ConfigError, match="compare.time_budget_s > 0"):
        validate(apply_overrides(cfg, {"compare.time_budget_s": "0"}))
    with pytest.raises(ConfigError, match="compare.match must be one of params, tokens, time"):
        validate(apply_overrides(cfg, {"compare.match": "flops"}))
    cfg.arms.grassmann.per_block = {"256": {"offsets": (1, 300)}}  # a per-block override is checked at its block
    with pytest.raises(ConfigError, match=r"arms.grassmann.offsets=\(1, 300\).*< data.block_size=256.*block 256"):
        validate(cfg)
    cfg.arms.grassmann.per_block = {"1024": {"offsets": (1, 300)}}
    validate(cfg)
    cfg.arms.transformer.train = {"learning_rate": -1.0}
    with pytest.raises(ConfigError, match="arms.transformer.*train.learning_rate=-1.0 is out of range"):
        validate(cfg)
