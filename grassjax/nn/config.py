"""One dataclass configures every model in grassjax.nn."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

MIXERS = ("attention", "grassmann", "sliding_window", "conv")
NORM_PLACEMENTS = ("pre", "post")
MODEL_KINDS = ("lm", "bigram")
PARTNER_MIXES = ("none", "per_offset", "per_offset_scalar")
DENSE_LAYOUTS = ("out_in", "in_out")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a language model.

    kind: "lm" (embeddings + blocks) or "bigram" (a next-token lookup table).
    mixer: what mixes information across time: "attention", "grassmann", or one of two local
      controls that read the same span as a Grassmann layer, positions t - max(offsets) .. t of
      that layer: "sliding_window" (causal attention over that span, window = max(offsets)) and
      "conv" (a causal depthwise convolution with kernel max(offsets) + 1, then a d x d
      projection; attention-free).
    norm: "pre" = x + f(LN(x)) residual blocks (default; trains stably at depth);
      "post" = the paper's arrangement. For Grassmann that is
      ĥ = Dropout(LN(mix(x))), out = LN(ĥ + FFN(ĥ)), with no residual around the
      mixer because the gate already blends h and g; for attention it is the
      classic LN(x + attn(x)), LN(h + FFN(h)).
    offsets: Grassmann offsets δ. With offsets_per_layer=False every layer uses
      all of them; with True, layer i uses offsets[i] alone, which reads the
      paper's 12-entry schedule (1,1,2,2,...,16,16) as one offset per layer.
    rank: Grassmann reduced dimension r.
    grassmann_partner_mix: "none" = the paper's layer (partners averaged over offsets);
      "per_offset" = the order-keeping variant: each offset's normalised partner is mixed by its
      own r x r matrix M_δ = I + A_δ (A_δ starts at 0, so training starts from the paper's layer
      and weight decay pulls back towards it) before the average; still one projection
      (grassjax.functional.grassmann). "per_offset_scalar" = its control: M_δ = (1 + s_δ) I, one
      learned weight per offset (s starts at 0). It can re-weight offsets but, like the paper's
      mean, cannot tell which partner came from where; if it closes as much of the gap as
      "per_offset", keeping the order is not what helped.
    grassmann_out_proj: a d x d projection after the gate. The paper does not
      describe it, but its parameter counts only add up with one per layer.
    init_std: std of the N(0, init_std) initialisation of every matrix.
    dense_layout: how the dense layers that are applied to activations (q/k/v, the projections, the
      feed-forward, the head) store their kernels: "out_in", as PyTorch does (y = x Wᵀ + b; its
      backward runs faster on XLA:CPU), or "in_out", as nnx.Linear does (y = x W + b). Both start
      from the same values. Runs saved before the field existed are "in_out"
      (grassjax.train.config.LEGACY_VALUES). The Grassmann weights W_red, W_plu and W_gate stay
      (in, out) either way: grassjax.functional takes them so.
    dtype: compute dtype ("float32" or "bfloat16"); parameters stay float32.
    """

    vocab_size: int = 65
    block_size: int = 64
    kind: str = "lm"
    mixer: str = "grassmann"
    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 4
    d_ff: int = 512
    rank: int = 32
    offsets: tuple[int, ...] = (1, 2, 4, 8, 12, 16)
    offsets_per_layer: bool = False
    grassmann_out_proj: bool = True
    grassmann_partner_mix: str = "none"
    # Relative: pairs with sin∠(z_t, z_{t-δ}) < eps fade to 0 (functional/grassmann.py).
    grassmann_eps: float = 1e-6
    norm: str = "pre"
    dropout: float = 0.0  # on the residual branches and the feed-forward output
    attn_dropout: float = 0.0  # on the attention probabilities (attention mixers), as nanoGPT's
    use_bias: bool = True
    tie_embeddings: bool = True
    init_std: float = 0.02
    dtype: str = "float32"
    dense_layout: str = "out_in"

    def __post_init__(self):
        object.__setattr__(self, "offsets", tuple(int(o) for o in self.offsets))
        checks = [
            (self.kind in MODEL_KINDS,
             f"model.kind must be one of {MODEL_KINDS}, got {self.kind!r}"),
            (self.mixer in MIXERS, f"model.mixer must be one of {MIXERS}, got {self.mixer!r}"),
            (self.grassmann_partner_mix in PARTNER_MIXES,
             (f"model.grassmann_partner_mix must be one of {PARTNER_MIXES}, "
              f"got {self.grassmann_partner_mix!r}")),
            (self.norm in NORM_PLACEMENTS,
             f"model.norm must be one of {NORM_PLACEMENTS}, got {self.norm!r}"),
            (self.d_model % self.num_heads == 0,
             (f"model.d_model ({self.d_model}) must be divisible by model.num_heads "
              f"({self.num_heads})")),
            (self.rank >= 2, f"model.rank must be >= 2, got {self.rank}"),
            (len(self.offsets) > 0 and min(self.offsets) >= 1,
             f"model.offsets must be positive integers, got {self.offsets}"),
            (not self.offsets_per_layer or len(self.offsets) == self.num_layers,
             f"with model.offsets_per_layer=True, model.offsets needs one entry per layer "
             f"({self.num_layers}), got {len(self.offsets)}"),
            (0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}"),
            (0.0 <= self.attn_dropout < 1.0,
             f"model.attn_dropout must be in [0, 1), got {self.attn_dropout}"),
            (self.dtype in ("float32", "bfloat16"),
             f"model.dtype must be float32 or bfloat16, got {self.dtype!r}"),
            (self.dense_layout in DENSE_LAYOUTS,
             f"model.dense_layout must be one of {DENSE_LAYOUTS}, got {self.dense_layout!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def layer_offsets(self, layer: int) -> tuple[int, ...]:
        """The offsets used by block `layer`."""
        return (self.offsets[layer],) if self.offsets_per_layer else self.offsets

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Build from a dict / ConfigDict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**dict(values))
