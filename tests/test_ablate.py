"""The ablation experiment: arms x seeds through the comparison, with gaps, perplexity ratios and a waterfall."""

import dataclasses
import json
import math

import pytest

import experiments
from grassjax.nn import ModelConfig
from grassjax.studies import ablation, compare
from grassjax.studies.arms import validate_comparison as validate
from grassjax.train.config import apply_overrides
from tests.test_ngram import fake_evals, fake_result
from tests.test_train import run


def test_ablation_config_has_every_arm_and_each_is_a_valid_model():
    cfg = experiments.get_experiment("ablate_shakespeare").get_config()
    validate(cfg)
    arms = {name: ModelConfig.from_mapping({**cfg.model.to_dict(),
                                            **{k: v for k, v in cfg.arms[name].to_dict().items() if k != "train"}})
            for name in cfg.compare.arms}
    assert arms["grassmann"].offsets == (1, 2, 4, 8, 12, 16) and cfg.compare.waterfall_reference == "grassmann"
    assert {a.offsets for a in arms.values() if a.mixer == "grassmann" and not a.offsets_per_layer} >= \
        {(1,), (1, 2), (1, 2, 4, 8), (1, 2, 4, 8, 12, 16)}
    assert arms["offset_per_layer"].offsets_per_layer and len(arms["offset_per_layer"].offsets) == 4
    assert arms["partner_mix"].grassmann_partner_mix == "per_offset"
    assert arms["offset_weights"].grassmann_partner_mix == "per_offset_scalar"
    assert {a.mixer for a in arms.values()} == {"grassmann", "sliding_window", "conv", "attention"}
    assert cfg.compare.baseline == "transformer" and len(cfg.compare.ngram_contexts) > 0
    # The finalists (every seed) include each tuned arm, at a learning rate of its own.
    assert set(cfg.compare.finalists) <= set(cfg.compare.arms)
    assert cfg.arms.partner_mix_tuned.train.learning_rate != cfg.arms.transformer_tuned.train.learning_rate
    # Screening: a list of arm names needs no quotes on the command line.
    screened = apply_overrides(cfg, {"compare.arms": "grassmann, conv,transformer", "compare.seeds": "1"})
    assert screened.compare.arms == ("grassmann", "conv", "transformer") and screened.compare.seeds == 1


def test_waterfall_and_gap_columns_from_known_losses():
    # Whole-split val losses: reference 2.3 (two seeds), half-way arm 2.1, baseline 1.9.
    results = {"grassmann": [fake_result(2.2), fake_result(2.2)], "better": [fake_result(2.0)],
               "transformer": [fake_result(1.8)]}
    rows = compare.summarise(results, fake_evals({"grassmann": [2.25, 2.35], "better": [2.1], "transformer": [1.9]}))
    steps = ablation.waterfall(rows, reference="grassmann", baseline="transformer",
                              changes={"better": {"offsets": [1, 2]}})
    by_arm = {s["arm"]: s for s in steps}
    assert by_arm["better"]["closed"] == pytest.approx(0.2) and by_arm["better"]["closed_share"] == pytest.approx(0.5)
    assert by_arm["transformer"]["closed_share"] == pytest.approx(1.0) and by_arm["grassmann"]["closed"] == 0.0
    assert by_arm["better"]["ppl_ratio"] == pytest.approx(math.exp(0.2)) and by_arm["better"]["change"] == "offsets=(1, 2)"
    text = compare.report_markdown(rows, {}, exp_name="x", steps=10, baseline="transformer", waterfall_steps=steps,
                                   waterfall_reference="grassmann")
    table_row = next(l for l in text.splitlines() if l.startswith("| grassmann | 1,000 |"))
    assert f"| {0.4:+.4f} | {math.exp(0.4):.3f} | {100 * (2.3 / 1.9 - 1):+.2f}% |" in table_row
    waterfall_row = next(l for l in text.split("## Waterfall")[1].splitlines() if l.startswith("| better |"))
    assert "| +50.0% |" in waterfall_row and "| offsets=(1, 2) |" in waterfall_row


def test_an_arm_whose_val_loss_rises_after_its_best_is_called_overfitted():
    # The Transformer's sampled val loss bottoms out at step 10 and ends 0.5 nats higher; the Grassmann arm's
    # still falls (fake_result), so only the Transformer is named.
    rising = dataclasses.replace(fake_result(1.8), history=[{"step": 5, "val/loss": 1.6}, {"step": 10, "val/loss": 1.5},
                                                            {"step": 15, "val/loss": 2.0}])
    untimed = dataclasses.replace(rising, step_time_ms=math.nan, tokens_per_s=math.nan)  # resumed at its end
    results = {"grassmann": [fake_result(2.2)], "transformer": [rising, untimed]}
    rows = compare.summarise(results, fake_evals({"grassmann": [2.25], "transformer": [2.1, 2.1]}))
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["transformer"]["overfit"] == pytest.approx(0.5) and by_arm["transformer"]["best_step"] == 10
    assert by_arm["grassmann"]["overfit"] == 0.0 and by_arm["grassmann"]["best_step"] == 10
    assert by_arm["transformer"]["step_time_ms"] == 10.0 and by_arm["transformer"]["tokens_per_s"] == 100.0
    text = compare.report_markdown(rows, {}, exp_name="x", steps=15, baseline="transformer")
    assert "**Overfitting.** The last sampled val loss ends `transformer` 0.500 nats above its best (reached at " \
           "step 10)" in text and "`grassmann`" not in text.split("**Overfitting.**")[1].split("\n")[0]
    calm = compare.summarise({"grassmann": [fake_result(2.2)], "transformer": [fake_result(1.8)]},
                             fake_evals({"grassmann": [2.25], "transformer": [1.9]}))
    assert "Overfitting" not in compare.report_markdown(calm, {}, exp_name="x", steps=10, baseline="transformer")


def test_tiny_ablation_end_to_end(tmp_path, text_data_dir):
    workdir = tmp_path / "ablate"
    result = run("ablate_shakespeare", workdir, text_data_dir, compare__arms="grassmann,conv,transformer",
                 compare__seeds=1, compare__ngram_contexts="1,3", train__steps=6, train__eval_every=3,
                 stats__enabled=False)
    report = (workdir / "report" / "report.md").read_text()
    summary = json.loads((workdir / "report" / "summary.json").read_text())
    # Every number comes from the runs' own result files.
    best = {arm: json.loads((workdir / arm / "seed0" / "eval-val.json").read_text())["loss"]
            for arm in ("grassmann", "conv", "transformer")}
    gap = best["grassmann"] - best["transformer"]
    steps = {s["arm"]: s for s in result["waterfall"]}
    assert steps["conv"]["closed"] == pytest.approx(best["grassmann"] - best["conv"])
    assert steps["conv"]["closed_share"] == pytest.approx((best["grassmann"] - best["conv"]) / gap)
    rows = {r["arm"]: r for r in summary["rows"]}
    assert rows["conv"]["delta_loss"] == pytest.approx(best["conv"] - best["transformer"])
    assert rows["conv"]["ppl_ratio"] == pytest.approx(math.exp(best["conv"] - best["transformer"]))
    assert rows["conv"]["params"] < rows["grassmann"]["params"] and rows["conv"]["gflops_per_step"] >= 0
    assert "## Waterfall" in report and "| Δ loss | ppl ratio |" in report and "| mixer=conv |" in report
    assert f"| {100 * steps['conv']['closed_share']:+.1f}% |" in report
    assert [r["order"] for r in summary["ngram_rows"]] == [2, 4] and "| KN 4-gram" in report
