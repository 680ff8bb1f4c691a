"""Attention and Grassmann statistics on a fixed probe batch, computed in one jitted call.

The probe is separate from the train step: with statistics disabled it is
never compiled or run, so the training hot path carries none of this work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grassjax.functional import stats
from grassjax.nn import ModelConfig


def make_probe(graphdef, model_cfg: ModelConfig, *, hist_bins: int = 20, compiler_options=None):
    """Returns probe(params, tokens (B, T)) -> (scalars, maps), both dicts of arrays.

    scalars: per-layer statistics keyed by name ("attn/entropy/L0" -> (H,),
      "grassmann/gate_mean/L1" -> ()).
    maps: per-layer images for the first probe sequence:
      attention "attn/map/L{i}" (H, T, T); Grassmann "grassmann/offset_map/L{i}" (T, m)
      and "grassmann/gate_map/L{i}" (T, C).
    """

    def probe(params, tokens):
        model = nnx.merge(graphdef, params)
        _, intermediates = model(tokens, return_intermediates=True)
        scalars, maps = {}, {}
        for i, inter in enumerate(intermediates):
            if inter is None:
                continue
            if model_cfg.mixer == "attention":
                for name, value in stats.attention_stats(inter["weights"],
                                                         inter["max_logit"]).items():
                    scalars[f"attn/{name}/L{i}"] = value
                maps[f"attn/map/L{i}"] = inter["weights"][0]
            else:
                offsets = model_cfg.layer_offsets(i)
                layer = stats.grassmann_stats(inter, offsets, eps=model_cfg.grassmann_eps,
                                              hist_bins=hist_bins)
                for name, value in layer.items():
                    scalars[f"grassmann/{name}/L{i}"] = value
                maps[f"grassmann/offset_map/L{i}"] = stats.offset_share_map(
                    jax.tree_util.tree_map(lambda a: a[:1] if a.ndim > 2 else a, inter), offsets,
                    model_cfg.grassmann_eps)
                maps[f"grassmann/gate_map/L{i}"] = inter["alpha"][0].astype(jnp.float32)
        return scalars, maps

    return jax.jit(probe, compiler_options=compiler_options)


def flatten_scalars(scalars: dict, model_cfg: ModelConfig) -> dict[str, float]:
    """Per-head / per-offset vectors -> one W&B scalar each, plus a layer mean.

    "attn/entropy/L0" (H,) -> "attn/entropy/L0" (mean over heads) and "attn/entropy/L0/h{k}".
    "grassmann/offset_share/L0" (m,) -> "grassmann/offset_share/L0/d{δ}" (one per offset; repeats
    summed).
    Histograms are returned by `histograms` instead.
    """
    flat = {}
    for key, value in scalars.items():
        value = np.asarray(value)
        if "/gate_hist/" in key:
            continue
        if "/offset_share/" in key:
            layer = int(key.rsplit("/L", 1)[1])
            for delta, share in zip(model_cfg.layer_offsets(layer), value):
                flat[f"{key}/d{delta}"] = flat.get(f"{key}/d{delta}", 0.0) + float(share)
            continue
        if value.ndim == 0:
            flat[key] = float(value)
        else:
            flat[key] = float(value.mean())
            for k, v in enumerate(value):
                flat[f"{key}/h{k}"] = float(v)
    return flat


def histograms(scalars: dict) -> dict[str, np.ndarray]:
    """The gate histograms (counts over [0, 1]) from a probe result."""
    return {key: np.asarray(v) for key, v in scalars.items() if "/gate_hist/" in key}


def map_figures(maps: dict, model_cfg: ModelConfig, *, layers: tuple[int, ...], max_heads: int = 4):
    """Matplotlib figures for the selected layers (negative indices count from the end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers = 1 + max((int(k.rsplit("/L", 1)[1]) for k in maps), default=-1)
    wanted = sorted({l % num_layers for l in layers}) if num_layers else []
    figures = {}
    for key, value in maps.items():
        prefix, layer = key.rsplit("/L", 1)
        if int(layer) not in wanted:
            continue
        value = np.asarray(value, np.float32)
        if prefix == "attn/map":
            heads = value[:max_heads]
            fig, axes = plt.subplots(1, len(heads), figsize=(3.2 * len(heads), 3.2), squeeze=False)
            for h, ax in enumerate(axes[0]):
                ax.imshow(heads[h], cmap="viridis", vmin=0.0)
                ax.set_title(f"layer {layer} head {h}", fontsize=9)
                ax.set_xlabel("key position")
                ax.set_ylabel("query position")
        elif prefix == "grassmann/offset_map":
            fig, ax = plt.subplots(figsize=(4, 3.2))
            im = ax.imshow(value, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0,
                           interpolation="nearest")
            ax.set_title(f"layer {layer}: share of each offset", fontsize=9)
            offsets = model_cfg.layer_offsets(int(layer))
            ax.set_xticks(range(len(offsets)), [str(o) for o in offsets])
            ax.set_xlabel("offset δ")
            ax.set_ylabel("position t")
            fig.colorbar(im, ax=ax)
        else:  # gate map
            fig, ax = plt.subplots(figsize=(5, 3.2))
            im = ax.imshow(value, aspect="auto", cmap="coolwarm", vmin=0.0, vmax=1.0,
                           interpolation="nearest")
            ax.set_title(f"layer {layer}: gate α (1 = keep h, 0 = take g)", fontsize=9)
            ax.set_xlabel("channel")
            ax.set_ylabel("position t")
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        figures[key] = fig
    return figures
