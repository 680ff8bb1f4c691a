"""Flax NNX modules wrapping grassjax.functional, and the language models."""

from grassjax.nn.config import ModelConfig
from grassjax.nn.layers import Block, CausalGrassmannMixing, CausalSelfAttention, FeedForward
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
    "CausalGrassmannMixing",
    "CausalSelfAttention",
    "FeedForward",
    "LanguageModel",
    "ModelConfig",
    "analytic_param_count",
    "build_model",
    "param_counts",
]
