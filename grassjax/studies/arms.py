"""A comparison's arms: its `compare` section, each arm as it runs (ArmSpec), its single-run config,
and the checks on both sections.

An arm changes the model fields listed under `arms.<name>`, and train or data settings under its
`train` and `data` keys; with compare.blocks it runs at each block size, with `per_block` changes
there.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections

from grassjax.train.config import (NON_NEGATIVE, POSITIVE, ConfigError, Range, check_learning_rates,
                                   check_model, check_ranges, validate)

MATCHES = ("params", "tokens", "time")


def compare_section(**values) -> ml_collections.ConfigDict:
    """A comparison's `compare` section: these defaults, updated by `values` (an experiment's
    choices).

    match: params | tokens | time, how long each arm trains (grassjax.studies.matching says how).
    blocks: run every arm at each of these block sizes (runs named <arm>_b<block>), with batch =
    tokens_per_step // block where tokens_per_step > 0; an arm's per_block.<block> entry overrides
    its settings at that size. evals_per_run > 0 sets each run's eval_every to
    steps // evals_per_run.
    """
    section = ml_collections.ConfigDict(dict(
        arms=("grassmann", "transformer"), seeds=3, paper_variant=False,
        baseline="transformer",  # the gap columns are relative to this arm
        match="params", time_budget_s=0.0, time_probe_steps=10, tokens=0,
        blocks=(), tokens_per_step=0, evals_per_run=0,
        finalists=(),  # arms run at every seed; the others only at the first (empty: all arms)
        # Kneser-Ney reference rows / plot lines, by characters of context: e.g. (1, 3, 5)
        ngram_contexts=(),
        # an arm: the ablation waterfall measures the share of its gap each arm closes
        waterfall_reference="",
    ))
    section.update(values)
    return section


class ArmSpec(NamedTuple):
    """One arm of a comparison as it runs: `name` is its run folder and W&B tag (<arm>, or
    <arm>_b<block> with compare.blocks), `arm` its entry in `arms`, `changes` the model fields and
    train/data sub-dicts it sets."""

    name: str
    arm: str
    block: int | None
    changes: dict


ARM_SECTIONS = ("train", "data")  # sections an arm may change besides the model fields


def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = {**out.get(key, {}), **value} if key in ARM_SECTIONS else value
    return out


def comparison_arms(cfg: ml_collections.ConfigDict) -> list[ArmSpec]:
    """The arms a comparison runs, in order: compare.arms (+ grassmann_paper with
    compare.paper_variant), each at every compare.blocks size when blocks are given
    (block-major)."""
    names = list(cfg.compare.arms) + (["grassmann_paper"] if cfg.compare.get("paper_variant")
                                      else [])
    unknown = [name for name in names if name not in cfg.arms]
    if unknown:
        raise ConfigError(f"--config.compare.arms: unknown arm(s) {unknown}; "
                          f"defined: {', '.join(cfg.arms.keys())}")
    blocks, tokens = tuple(cfg.compare.get("blocks", ())), cfg.compare.get("tokens_per_step", 0)
    specs = []
    for block in blocks or (None,):
        for name in names:
            changes = cfg.arms[name].to_dict()
            per_block = changes.pop("per_block", {})
            if block is None:
                specs.append(ArmSpec(name, name, None, changes))
                continue
            sized = {"data": {"block_size": block}}
            if tokens:  # constant tokens per step while the batch allows it (at least one row)
                sized["train"] = {"batch_size": max(1, tokens // block)}
            changes = _merged(_merged(changes, sized), per_block.get(str(block), {}))
            specs.append(ArmSpec(f"{name}_b{block}", name, block, changes))
    return specs


def apply_arm(cfg: ml_collections.ConfigDict, arm: str,
              changes: dict) -> ml_collections.ConfigDict:
    """A copy of cfg with one arm's changes: model fields, and train/data settings under those
    keys."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for key, value in changes.items():
        # per-arm training or data settings, e.g. a tuned learning rate, a block size
        if key in ARM_SECTIONS:
            for sub_key, sub_value in value.items():
                if sub_key not in cfg[key]:
                    raise ConfigError(f"arms.{arm}.{key}.{sub_key}: not a {key} setting; "
                                      f"valid: {sorted(cfg[key].keys())}")
                cfg[key][sub_key] = sub_value
        elif key not in cfg.model:
            raise ConfigError(f"arms.{arm}.{key}: not a model setting "
                              f"(or one of {', '.join(ARM_SECTIONS)}); "
                              f"valid: {sorted(cfg.model.keys())}")
        else:
            cfg.model[key] = value
    return cfg


def arm_config(config, arm: str, seed: int, group: str,
               spec: ArmSpec | None = None) -> ml_collections.ConfigDict:
    """The single-run config of one arm and seed (`spec`: the arm at one of compare.blocks)."""
    spec = spec or ArmSpec(arm, arm, None, {k: v for k, v in config.arms[arm].to_dict().items()
                                            if k != "per_block"})
    cfg = apply_arm(config, spec.arm, spec.changes)
    del cfg.arms, cfg.compare
    cfg.train.seed = seed
    cfg.wandb.group = group
    cfg.wandb.tags = (tuple(cfg.wandb.tags) + (f"arm:{spec.name}",)
                      + ((f"block:{spec.block}",) if spec.block else ()))
    return cfg


COMPARE_RANGES: dict[str, Range] = {
    "compare.seeds": POSITIVE, "compare.time_budget_s": NON_NEGATIVE,
    "compare.time_probe_steps": POSITIVE, "compare.tokens": NON_NEGATIVE,
    "compare.tokens_per_step": NON_NEGATIVE, "compare.evals_per_run": NON_NEGATIVE,
}


def validate_comparison(cfg: ml_collections.ConfigDict) -> None:
    """`validate` for any experiment config: a single run's checks, then a comparison's compare
    section and every arm that will run, each as the single-run config it becomes."""
    validate(cfg)
    if "compare" in cfg:
        check_ranges(cfg, ranges=COMPARE_RANGES)
        match = cfg.compare.get("match", "params")
        if match not in MATCHES:
            raise ConfigError(f"--config.compare.match must be one of {', '.join(MATCHES)}, "
                              f"got {match!r}")
        if match == "time" and not cfg.compare.get("time_budget_s", 0) > 0:
            raise ConfigError("--config.compare.match=time needs "
                              "--config.compare.time_budget_s > 0 "
                              "(seconds of training per run)")
        # Finalists outside compare.arms are skipped (a screen of fewer arms), but each must be a
        # defined arm.
        stray = [a for a in cfg.compare.get("finalists", ()) if a not in cfg.get("arms", {})]
        if stray:
            raise ConfigError(f"--config.compare.finalists: {stray} are not defined arms; "
                              f"defined: {', '.join(cfg.get('arms', {}).keys())}")
    if "arms" not in cfg:
        return
    # Only the arms that will run: a screening override (say model.num_layers=2) need not suit the
    # others.
    specs = comparison_arms(cfg) if "compare" in cfg else \
        [ArmSpec(name, name, None, cfg.arms[name].to_dict()) for name in cfg.arms]
    for spec in specs:
        changes = {k: v for k, v in spec.changes.items() if k != "per_block"}
        note = f" (arm {spec.name}, block {spec.block})" if spec.block else ""
        variant = apply_arm(cfg, spec.arm, changes)
        check_ranges(variant, f"arms.{spec.arm}{note}: ")
        check_learning_rates(variant, f"arms.{spec.arm}{note}: ")
        check_model(variant, f"arms.{spec.arm}", note)
