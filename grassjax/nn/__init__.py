"""Flax NNX modules wrapping grassjax.functional, and the language models."""

from grassjax.nn.config import ModelConfig
from grassjax.nn.layers import (
    Block,
    CausalConvMixing,
    CausalGrassmannMixing,
    CausalSelfAttention,
    FeedForward,
    SlidingWindowAttention,
)
from grassjax.nn.model import (
    BigramLanguageModel,
    LanguageModel,
    analytic_param_count,
    build_model,
    param_counts,
)

__all__ = [
    "BigramLanguageModel",
    "Block",
    "CausalConvMixing",
    "CausalGrassmannMixing",
    "CausalSelfAttention",
    "FeedForward",
    "LanguageModel",
    "ModelConfig",
    "SlidingWindowAttention",
    "analytic_param_count",
    "build_model",
    "param_counts",
]
