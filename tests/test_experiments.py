"""Experiment registry and type-checked config overrides."""

import pytest

import experiments
from grassjax.nn import ModelConfig, analytic_param_count
from grassjax.studies.arms import validate_comparison as validate
from grassjax.train.config import ConfigError, apply_overrides, default_config


def _params(cfg):
    return analytic_param_count(ModelConfig.from_mapping({**cfg.model.to_dict(), "vocab_size": 65,
                                                          "block_size": cfg.data.block_size}))


@pytest.mark.parametrize("grassmann, transformer", [("grassmann_shakespeare_paper", "transformer_shakespeare"),
                                                     ("grassmann_shakespeare", "transformer_shakespeare"),
                                                     ("grassmann_shakespeare_gpu", "transformer_shakespeare_gpu")])
def test_transformer_and_grassmann_are_matched_within_5_percent(grassmann, transformer):
    grass = experiments.get_experiment(grassmann).get_config()
    trans = experiments.get_experiment(transformer).get_config()
    assert grass.model.mixer == "grassmann" and trans.model.mixer == "attention"
    assert abs(_params(grass) / _params(trans) - 1) < 0.05
    # The same budget and data; the default Grassmann LM differs only in its tuned learning rate.
    tuned = {"learning_rate", "min_lr"} if grassmann == "grassmann_shakespeare" else set()
    same = lambda section: {k: v for k, v in section.to_dict().items() if k not in tuned}  # noqa: E731
    assert same(grass.train) == same(trans.train) and grass.data.to_dict() == trans.data.to_dict()


def test_default_grassmann_is_the_tuned_order_keeping_layer_and_the_paper_one_is_a_flag_away():
    default = experiments.get_experiment("grassmann_shakespeare").get_config()
    paper = experiments.get_experiment("grassmann_shakespeare_paper").get_config()
    assert (default.model.grassmann_partner_mix, default.train.learning_rate) == ("per_offset", 8e-3)
    assert (paper.model.grassmann_partner_mix, paper.train.learning_rate) == ("none", 1e-3)
    flagged = apply_overrides(default, {"model.grassmann_partner_mix": "none", "train.learning_rate": "1e-3",
                                        "train.min_lr": "1e-4"})
    assert flagged.to_dict() == paper.to_dict()


def test_cpu_default_follows_nanogpt_cpu_recipe():
    cfg = experiments.get_experiment("grassmann_shakespeare").get_config()
    assert (cfg.model.num_layers, cfg.model.d_model, cfg.data.block_size, cfg.train.batch_size, cfg.train.steps) == \
        (4, 128, 64, 12, 2000)


def test_every_experiment_config_is_valid():
    for exp in experiments.EXPERIMENTS.values():
        validate(exp.get_config())


def test_unknown_experiment_lists_the_valid_ones():
    with pytest.raises(experiments.UnknownExperimentError) as err:
        experiments.get_experiment("grassman_shakespeare")
    assert "grassmann_shakespeare" in str(err.value) and "transformer_shakespeare" in str(err.value)


def test_overrides_are_type_checked_and_applied():
    cfg = apply_overrides(default_config(), {"train.steps": "7", "train.learning_rate": "3e-4",
                                             "model.offsets": "1,2,3", "data.allow_custom_text": "true",
                                             "model.mixer": "attention"})
    assert cfg.train.steps == 7 and cfg.train.learning_rate == 3e-4 and tuple(cfg.model.offsets) == (1, 2, 3)
    assert cfg.data.allow_custom_text is True and cfg.model.mixer == "attention"
    assert default_config().train.steps == 2000  # the original is untouched


@pytest.mark.parametrize("overrides, match", [
    ({"train.stepz": "5"}, "unknown key.*steps"),
    ({"trian.steps": "5"}, "unknown section.*train"),
    ({"train.steps": "five"}, "expected an integer"),
    ({"train.learning_rate": "fast"}, "expected a number"),
    ({"data.allow_custom_text": "maybe"}, "True or False"),
    ({"model.offsets": "1,two"}, "comma-separated"),
    ({"train": "5"}, "is a section"),
])
def test_bad_overrides_name_the_fix(overrides, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(default_config(), overrides)


def test_validate_rejects_impossible_values():
    with pytest.raises(ConfigError, match="train.batch_size"):
        validate(apply_overrides(default_config(), {"train.batch_size": "0"}))
    with pytest.raises(ConfigError, match="divisible"):
        validate(apply_overrides(default_config(), {"model.num_heads": "3"}))


@pytest.mark.parametrize("overrides, match", [
    ({"train.keep_checkpoints": "0"}, r"train.keep_checkpoints=0 is out of range; allowed: \[1, inf\)"),
    ({"model.d_model": "0"}, r"model.d_model=0 is out of range; allowed: \[1, inf\)"),
    ({"train.learning_rate": "-1"}, r"train.learning_rate=-1.0 is out of range; allowed: \(0, inf\)"),
    ({"train.warmup_steps": "-10"}, r"train.warmup_steps=-10 is out of range; allowed: \[0, inf\)"),
    ({"model.rank": "512"}, r"model.rank=512 must be <= model.d_model=128"),
    ({"model.offsets": "1,64"}, r"every offset must be < data.block_size=64"),
    ({"train.min_lr": "1"}, r"train.min_lr=1.0 must be <="),
    ({"data.val_fraction": "1.5"}, r"data.val_fraction=1.5 is out of range; allowed: \(0, 1\)"),
])
def test_validate_checks_every_range_and_names_the_key(overrides, match):
    cfg = apply_overrides(experiments.get_experiment("grassmann_shakespeare").get_config(), overrides)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


@pytest.mark.parametrize("overrides, match", [
    ({"arms.transformer_tuned.train.min_lr": "1"},
     r"arms.transformer_tuned: --config.train.min_lr=1.0 must be <= train.learning_rate=0.004"),
    ({"arms.transformer_tuned.train.learning_rate": "-1"},
     r"arms.transformer_tuned: --config.train.learning_rate=-1.0 is out of range"),
])
def test_validate_checks_an_arms_train_changes(overrides, match):
    cfg = experiments.get_experiment("ablate_shakespeare").get_config()
    validate(cfg)
    with pytest.raises(ConfigError, match=match):
        validate(apply_overrides(cfg, overrides))
    cfg.arms.transformer_tuned.train.lr = 1.0
    with pytest.raises(ConfigError, match=r"arms.transformer_tuned.train.lr: not a train setting"):
        validate(cfg)
