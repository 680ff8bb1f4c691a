"""Experiment configs as data: the shared defaults, and type-checked command-line overrides.

An experiment config is an ml_collections ConfigDict with sections model
(grassjax.nn.ModelConfig fields), data, train, stats and wandb.
"""

from __future__ import annotations

import ast
import dataclasses

import ml_collections

from grassjax.nn import ModelConfig


class ConfigError(ValueError):
    """A bad --config.<key>=<value> override; the message says what was expected."""


def default_config() -> ml_collections.ConfigDict:
    """Defaults every experiment starts from: nanoGPT's CPU recipe, Grassmann mixer."""
    cfg = ml_collections.ConfigDict()
    model = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    # Set from the data at run time, not by hand.
    del model["vocab_size"], model["block_size"]
    cfg.model = ml_collections.ConfigDict(model)

    cfg.data = ml_collections.ConfigDict(dict(
        dataset="tinyshakespeare",  # or "wikitext2" (WordPiece tokens)
        block_size=64,
        val_fraction=0.1,  # tinyshakespeare: the last 10% is validation
        allow_custom_text=False,  # accept a text whose sha256 is not tiny Shakespeare's
        vocab_size=30522,  # wikitext2: WordPiece vocabulary trained on the training split
        vocab_file="",  # wikitext2: use this BERT vocab.txt instead of training one
    ))
    cfg.train = ml_collections.ConfigDict(dict(
        seed=0,
        steps=2000,
        epochs=0.0,  # > 0: train this many passes over the training tokens instead of `steps`
        stop_after=0,  # > 0: stop this invocation at that step (the schedule still spans `steps`)
        batch_size=12,  # global: rows per optimizer step, over all devices and accumulation steps
        per_device_batch_size=0,  # > 0: set the batch per device instead; global = this x devices x accum
        grad_accum_steps=1,  # microbatches per optimizer step (lax.scan), to fit big batches in memory
        learning_rate=1e-3,
        min_lr=1e-4,
        warmup_steps=100,
        weight_decay=0.1,
        beta1=0.9,
        beta2=0.99,
        grad_clip=1.0,
        log_every=10,
        eval_every=250,
        eval_batches=40,
        checkpoint_every=500,
        keep_checkpoints=2,
        sample_prompt="\n",
        sample_tokens=200,
        temperature=0.8,
        top_k=0,  # 0 = no top-k filtering
    ))
    cfg.stats = ml_collections.ConfigDict(dict(
        enabled=True,  # attention / Grassmann statistics on a fixed probe batch at each eval
        probe_batch=4,  # sequences in the probe batch (the first is drawn in the maps)
        images=True,  # attention maps, offset and gate maps, as images
        image_layers=(0, -1),  # which layers get images (negative counts from the end)
        hist_bins=20,
    ))
    cfg.wandb = ml_collections.ConfigDict(dict(project="grassjax", name="", group="", tags=()))
    return cfg


def _parse_value(text: str, current, key: str):
    """Parse `text` into the type of the current value of `key`."""
    kind = type(current)
    try:
        if isinstance(current, bool):
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError
            return lowered in ("true", "1")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if isinstance(current, (tuple, list)) and current and isinstance(current[0], str):
            # A list of names (e.g. --config.compare.arms=grassmann,transformer): no quotes needed.
            text = text.strip()
            if text.startswith(("(", "[")):
                value = ast.literal_eval(text)
                return tuple(value) if isinstance(value, (tuple, list)) else (value,)
            return tuple(part.strip() for part in text.split(",") if part.strip())
        if isinstance(current, (tuple, list)):
            value = ast.literal_eval(text if text.strip().startswith(("(", "[")) else f"({text},)")
            value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
            if current and not all(isinstance(v, type(current[0])) for v in value):
                raise ValueError
            return value
    except (ValueError, SyntaxError):
        pass
    example = {bool: "True or False", int: "an integer", float: "a number", tuple: "a comma-separated list, e.g. 1,2,4",
               list: "a comma-separated list"}.get(kind, kind.__name__)
    raise ConfigError(f"--config.{key}={text!r}: expected {example} (current value {current!r})")


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """Apply {"train.steps": "100", ...} to a copy of cfg, type-checked against the existing values."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for key, text in overrides.items():
        *path, leaf = key.split(".")
        node = cfg
        for i, part in enumerate(path):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                valid = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
                raise ConfigError(f"--config.{key}: unknown section {'.'.join(path[: i + 1])!r}; valid: {valid}")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            valid = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
            raise ConfigError(f"--config.{key}: unknown key; valid keys here: {valid}")
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key} is a section; set one of its keys: {', '.join(sorted(node[leaf].keys()))}")
        node[leaf] = _parse_value(text, node[leaf], key)
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Fail early, with the key to fix, on values no run could use."""
    tc = cfg.train
    positive = {"train.steps": tc.steps, "train.batch_size": tc.batch_size, "train.eval_every": tc.eval_every,
                "train.log_every": tc.log_every, "train.eval_batches": tc.eval_batches,
                "train.checkpoint_every": tc.checkpoint_every, "data.block_size": cfg.data.block_size}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"--config.{key} must be positive, got {value}")
    if cfg.data.dataset not in ("tinyshakespeare", "wikitext2"):
        raise ConfigError(f"--config.data.dataset must be tinyshakespeare or wikitext2, got {cfg.data.dataset!r}")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"--config.data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    variants = {"model": {}}
    if "arms" in cfg:  # comparison configs: each arm overrides some model fields
        # Only the arms that will run: a screening override (say model.num_layers=2) need not suit the others.
        selected = list(cfg.arms.keys())
        if "compare" in cfg:
            selected = list(cfg.compare.arms) + (["grassmann_paper"] if cfg.compare.get("paper_variant") else [])
        unknown = [name for name in selected if name not in cfg.arms]
        if unknown:
            raise ConfigError(f"--config.compare.arms: unknown arm(s) {unknown}; defined: {', '.join(cfg.arms.keys())}")
        variants.update({f"arms.{name}": cfg.arms[name].to_dict() for name in selected})
    for where, changes in variants.items():
        try:
            ModelConfig.from_mapping({**cfg.model.to_dict(), **changes, "block_size": cfg.data.block_size})
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
