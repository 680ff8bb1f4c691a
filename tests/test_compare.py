"""The head-to-head comparison end to end, and the cost of statistics on the train step."""

import jax
import numpy as np
import pytest
from flax import nnx

from grassjax.runlog import offline as wandb_offline
from grassjax.nn import ModelConfig, build_model
from grassjax.train.config import ConfigError, default_config
from grassjax.train.optim import train_hparams
from grassjax.train.probe import make_probe
from grassjax.train.step import init_train_state, make_train_step
from tests.test_train import run


def test_tiny_comparison_writes_report_plots_and_wandb_statistics(tmp_path, text_data_dir):
    workdir = tmp_path / "cmp"
    result = run("compare_shakespeare", workdir, text_data_dir, wandb_mode="offline",
                 compare__seeds=2, train__steps=10, train__eval_every=5)
    report = (workdir / "report" / "report.md").read_text()
    assert "| grassmann |" in report and "| transformer |" in report and "## Sample: grassmann" in report
    rows = {r["arm"]: r for r in result["rows"]}
    assert rows["grassmann"]["seeds"] == rows["transformer"]["seeds"] == 2
    # Final numbers are the whole-split evaluation of each run, averaged over seeds.
    import json

    full = [json.loads((workdir / "grassmann" / f"seed{s}" / "eval-val.json").read_text())["loss"] for s in (0, 1)]
    assert rows["grassmann"]["val_loss"] == np.mean(full) and "loss, best checkpoint (validation split)" in report
    for png in ("val_loss.png", "attention_entropy.png", "grassmann_gate.png"):
        assert (workdir / "report" / png).stat().st_size > 10_000
    # Both arms' offline W&B runs carry their statistics, and images.
    attn = set().union(*wandb_offline.read_history(workdir / "transformer" / "seed0"))
    grass = set().union(*wandb_offline.read_history(workdir / "grassmann" / "seed1"))
    assert {"attn/entropy/L0", "attn/entropy/L0/h1", "attn/max_logit/L0", "attn/distance/L0"} <= attn
    assert any(k.startswith("attn/map/L0") for k in attn)
    assert {"grassmann/gate_mean/L0", "grassmann/gate_std/L0"} <= grass
    assert any(k.startswith("grassmann/gate_hist/L0") for k in grass)
    # The report run holds the table.
    report_history = set().union(*wandb_offline.read_history(workdir / "report"))
    assert any(k.startswith("comparison") for k in report_history)
    # ... and the report itself, as an artifact.
    report = [a for a in wandb_offline.read_artifacts(workdir / "report") if a["type"] == "report"]
    assert len(report) == 1 and {"report.md", "summary.json", "val_loss.png"} <= set(report[0]["files"])


def test_paper_variant_adds_a_third_arm_and_only_finalists_get_every_seed(tmp_path, text_data_dir):
    result = run("compare_shakespeare", tmp_path / "cmp", text_data_dir, compare__seeds=2,
                 compare__finalists=("transformer",), compare__paper_variant=True,
                 train__steps=4, train__eval_every=4, stats__enabled=False)
    assert [(r["arm"], r["seeds"]) for r in result["rows"]] == [("grassmann", 1), ("transformer", 2),
                                                                ("grassmann_paper", 1)]
    assert not (tmp_path / "cmp" / "grassmann" / "seed1").exists()
    with pytest.raises(ConfigError, match=r"compare.finalists: \['conv'\] are not defined arms"):
        run("compare_shakespeare", tmp_path / "cmp2", text_data_dir, compare__finalists=("conv",))


def _small_state(mixer):
    cfg = ModelConfig(vocab_size=11, block_size=16, num_layers=1, d_model=16, num_heads=2, d_ff=32, rank=4,
                      offsets=(1, 2), mixer=mixer)
    graphdef, params = nnx.split(build_model(cfg), nnx.Param)
    hparams = train_hparams(default_config().train)
    return cfg, graphdef, hparams, init_train_state(params, hparams)


def test_train_step_contains_none_of_the_statistics_work():
    """Structural check on the jaxprs: the statistics live in the separate probe, not the train step.

    Attention entropy needs a log of the weights: the train step has only the loss's log.
    The Grassmann gate histogram is a search (a scan primitive): the train step has none.
    """
    x = np.zeros((2, 16), np.int32)
    for mixer in ("attention", "grassmann"):
        cfg, graphdef, hparams, state = _small_state(mixer)
        step = make_train_step(graphdef, dropout=0.0)
        assert sorted(jax.eval_shape(step, state, x, x, hparams)[1]) == ["grad_norm", "loss", "update_norm"]
        train_jaxpr = str(jax.make_jaxpr(step)(state, x, x, hparams))
        probe_jaxpr = str(jax.make_jaxpr(make_probe(graphdef, cfg))(state.params, x))
        if mixer == "attention":
            assert train_jaxpr.count(" log ") == 1 < probe_jaxpr.count(" log ")
        else:
            assert "scan[" not in train_jaxpr and "scan[" in probe_jaxpr


def test_disabled_statistics_are_never_built(tmp_path, text_data_dir, monkeypatch):
    import grassjax.train.evaluator as evaluate

    def forbidden(*args, **kwargs):
        raise AssertionError("the statistics probe was built although stats.enabled=False")

    monkeypatch.setattr(evaluate, "make_probe", forbidden)
    run("grassmann_shakespeare", tmp_path / "run", text_data_dir, stats__enabled=False, train__steps=4,
        train__eval_every=2)
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "grassmann/" not in text and "val/loss" in text


def test_arm_config_applies_model_and_train_changes_and_rejects_unknown_keys():
    from experiments.shakespeare import ablate_shakespeare
    from grassjax.studies.arms import arm_config

    config = ablate_shakespeare()
    config.arms.transformer.train = {"learning_rate": 2.5e-3}
    cfg = arm_config(config, "transformer", seed=7, group="g")
    assert (cfg.model.mixer, cfg.train.learning_rate, cfg.train.seed) == ("attention", 2.5e-3, 7)
    assert arm_config(config, "grassmann", seed=7, group="g").train.learning_rate == config.train.learning_rate
    config.arms.transformer.train = {"lr": 2.5e-3}
    with pytest.raises(ValueError, match="arms.transformer.train.lr: not a train setting"):
        arm_config(config, "transformer", seed=0, group="g")
    config.arms.transformer = {"mixr": "attention"}
    with pytest.raises(ValueError, match="arms.transformer.mixr: not a model setting"):
        arm_config(config, "transformer", seed=0, group="g")
