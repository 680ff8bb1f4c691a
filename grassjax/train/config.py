"""Experiment configs as data: the shared defaults, and type-checked command-line overrides.

An experiment config is an ml_collections ConfigDict with sections model
(grassjax.nn.ModelConfig fields), data, train, stats and wandb. `split_overrides` and
`apply_overrides` read the --config.<key>=<value> flags, `validate` checks the result.
"""

from __future__ import annotations

import ast
import dataclasses
import math

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
        # > 0: set the batch per device instead; global = this x devices x accum
        per_device_batch_size=0,
        # microbatches per optimizer step (lax.scan), to fit big batches in memory
        grad_accum_steps=1,
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
        images_every_eval=False,  # False: images at the first and the last evaluation only
        image_layers=(0, -1),  # which layers get images (negative counts from the end)
        hist_bins=20,
    ))
    # val_x_axis: the default x axis of the val/ and eval_train/ panels, "step" or "perf/elapsed_s"
    # (training seconds; time-matched comparisons set it). Both are in every row, so any panel can
    # switch.
    # log_checkpoints: the final and the best checkpoint as W&B model artifacts ("latest", "best").
    cfg.wandb = ml_collections.ConfigDict(dict(project="grassjax", name="", group="", tags=(),
                                               val_x_axis="step", log_checkpoints=True))
    return cfg


X_AXES = ("step", "perf/elapsed_s")

# Keys added since runs were first saved, with what their absence from an older run_config.json
# meant (where that differs from today's default): a resume compares against these, and a loaded
# run is built with them.
LEGACY_VALUES = {"model.dense_layout": "in_out"}


def with_legacy_values(saved: dict) -> dict:
    """A saved config (nested dicts) with each key of LEGACY_VALUES it lacks set to its old
    meaning."""
    saved = {k: (dict(v) if isinstance(v, dict) else v) for k, v in saved.items()}
    for key, value in LEGACY_VALUES.items():
        section, name = key.split(".")
        if isinstance(saved.get(section), dict):
            saved[section].setdefault(name, value)
    return saved


CONFIG_PREFIX = "--config."


# Why not ml_collections.config_flags: it binds --config to one config (a ConfigDict given when the
# flag is defined, or a file path in --config=path:arg), but here --exp=NAME, a flag parsed in the
# same pass, picks the config, and the CLI takes name lists without quotes
# (--config.compare.arms=grassmann,transformer). So `split_overrides` takes the --config.* arguments
# out of argv before absl parses the rest, and `apply_overrides` type-checks them against the
# chosen experiment's config.
def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """(argv without the --config.<key>=<value> arguments, {key: value}); ConfigError for one with
    no value."""
    rest, overrides = [], {}
    for arg in argv:
        if not arg.startswith(CONFIG_PREFIX):
            rest.append(arg)
            continue
        key, sep, value = arg[len(CONFIG_PREFIX):].partition("=")
        if not sep or not key:
            raise ConfigError(f"{arg!r} needs a value: write {CONFIG_PREFIX}<section>.<key>=VALUE")
        overrides[key] = value
    return rest, overrides


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
            value = float(text)
            if not math.isfinite(value):  # nan passes every range check, and inf most
                raise ConfigError(f"--config.{key}={text!r}: expected a finite number (current "
                                  f"value {current!r})")
            return value
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
    except ConfigError:
        raise
    except (ValueError, SyntaxError):
        pass
    example = {bool: "True or False", int: "an integer", float: "a number",
               tuple: "a comma-separated list, e.g. 1,2,4",
               list: "a comma-separated list"}.get(kind, kind.__name__)
    raise ConfigError(f"--config.{key}={text!r}: expected {example} (current value {current!r})")


def apply_overrides(cfg: ml_collections.ConfigDict,
                    overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """Apply {"train.steps": "100", ...} to a copy of cfg, type-checked against the existing
    values."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for key, text in overrides.items():
        *path, leaf = key.split(".")
        node = cfg
        for i, part in enumerate(path):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                valid = (", ".join(sorted(node.keys()))
                         if isinstance(node, ml_collections.ConfigDict) else "")
                raise ConfigError(f"--config.{key}: unknown section {'.'.join(path[: i + 1])!r}; "
                                  f"valid: {valid}")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            valid = (", ".join(sorted(node.keys()))
                     if isinstance(node, ml_collections.ConfigDict) else "")
            raise ConfigError(f"--config.{key}: unknown key; valid keys here: {valid}")
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key} is a section; set one of its keys: "
                              f"{', '.join(sorted(node[leaf].keys()))}")
        node[leaf] = _parse_value(text, node[leaf], key)
    return cfg


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed values of one numeric key: lo <= v <= hi (or < when open); None = unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, v) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        left = "(" if self.lo_open or self.lo is None else "["
        right = ")" if self.hi_open or self.hi is None else "]"
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{left}{lo}, {hi}{right}"


POSITIVE, NON_NEGATIVE, UNIT_OPEN = Range(1), Range(0), Range(0, 1, lo_open=True, hi_open=True)
# Every numeric key's allowed range, in one place. Cross-key rules (rank <= d_model, offsets < block
# size, min_lr <= learning_rate) are in validate below.
RANGES: dict[str, Range] = {
    "model.num_layers": POSITIVE, "model.d_model": POSITIVE, "model.num_heads": POSITIVE,
    "model.d_ff": POSITIVE,
    "model.rank": Range(2), "model.grassmann_eps": Range(0, lo_open=True),
    "model.dropout": Range(0, 1, hi_open=True),
    "model.attn_dropout": Range(0, 1, hi_open=True),
    "model.init_std": Range(0, lo_open=True),
    "data.block_size": POSITIVE, "data.val_fraction": UNIT_OPEN,
    "data.vocab_size": Range(16, 65536),
    "train.seed": NON_NEGATIVE, "train.steps": POSITIVE, "train.epochs": NON_NEGATIVE,
    "train.stop_after": NON_NEGATIVE,
    "train.batch_size": POSITIVE, "train.per_device_batch_size": NON_NEGATIVE,
    "train.grad_accum_steps": POSITIVE,
    "train.learning_rate": Range(0, lo_open=True), "train.min_lr": NON_NEGATIVE,
    "train.warmup_steps": NON_NEGATIVE,
    "train.weight_decay": NON_NEGATIVE, "train.beta1": Range(0, 1, hi_open=True),
    "train.beta2": Range(0, 1, hi_open=True), "train.grad_clip": Range(0, lo_open=True),
    "train.log_every": POSITIVE, "train.eval_every": POSITIVE, "train.eval_batches": POSITIVE,
    "train.checkpoint_every": POSITIVE, "train.keep_checkpoints": POSITIVE,
    "train.sample_tokens": NON_NEGATIVE,
    "train.temperature": NON_NEGATIVE, "train.top_k": NON_NEGATIVE,
    "stats.probe_batch": POSITIVE, "stats.hist_bins": POSITIVE,
}


def _lookup(cfg: ml_collections.ConfigDict, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


def _check_model(prefix: str, model: dict, block_size: int, note: str = "") -> None:
    """The cross-key rules of one model section (or comparison arm)."""
    if model.get("kind", "lm") != "lm":
        return
    if model["mixer"] == "grassmann":
        if model["rank"] > model["d_model"]:
            raise ConfigError(f"--config.{prefix}.rank={model['rank']} must be <= "
                              f"model.d_model={model['d_model']} "
                              f"(it is the reduced dimension of d_model){note}")
        if max(model["offsets"], default=0) >= block_size:
            raise ConfigError(f"--config.{prefix}.offsets={tuple(model['offsets'])}: every offset "
                              f"must be < data.block_size={block_size}, else it never sees a "
                              f"token{note}")


def check_ranges(cfg: ml_collections.ConfigDict, where: str = "",
                 ranges: dict[str, Range] = RANGES) -> None:
    """Every key of `ranges` that `cfg` has must lie in its range; ConfigError naming the key
    otherwise."""
    for key, allowed in ranges.items():
        value = _lookup(cfg, key)
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}--config.{key}={value} is not a finite number; "
                              f"allowed: {allowed}")
        if not allowed.contains(value):
            raise ConfigError(f"{where}--config.{key}={value} is out of range; allowed: {allowed}")


def check_learning_rates(cfg: ml_collections.ConfigDict, where: str = "") -> None:
    if cfg.train.min_lr > cfg.train.learning_rate:
        raise ConfigError(f"{where}--config.train.min_lr={cfg.train.min_lr} must be <= "
                          f"train.learning_rate={cfg.train.learning_rate}")


def check_model(cfg: ml_collections.ConfigDict, prefix: str = "model", note: str = "") -> None:
    """cfg.model builds a ModelConfig at cfg.data.block_size, and keeps the cross-key rules."""
    merged = cfg.model.to_dict()
    try:
        ModelConfig.from_mapping({**merged, "block_size": cfg.data.block_size})
    except ValueError as err:
        raise ConfigError(f"{prefix}{note}: {err}") from None
    _check_model(prefix, merged, cfg.data.block_size, note)


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Fail early, with the key to fix and its allowed range, on values no run could use.

    A comparison's own sections (arms, compare) are checked by
    grassjax.studies.arms.validate_comparison.
    """
    check_ranges(cfg)
    check_learning_rates(cfg)
    if cfg.data.dataset not in ("tinyshakespeare", "wikitext2"):
        raise ConfigError(f"--config.data.dataset must be tinyshakespeare or wikitext2, "
                          f"got {cfg.data.dataset!r}")
    if cfg.wandb.get("val_x_axis", "step") not in X_AXES:
        raise ConfigError(f"--config.wandb.val_x_axis must be one of {', '.join(X_AXES)}, "
                          f"got {cfg.wandb.val_x_axis!r}")
    check_model(cfg)
