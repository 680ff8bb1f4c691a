"""Flax NNX layers: thin wrappers that hold parameters and call grassjax.functional.

Shapes: B = batch, T = time, C = d_model, H = heads, D = head size, r = rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from grassjax import functional as F
from grassjax.nn.config import ModelConfig


def compute_dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def dense(cfg: ModelConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs, use_bias: bool | None = None) -> nnx.Linear:
    """Linear layer with the config's N(0, init_std) init and compute dtype."""
    return nnx.Linear(
        d_in, d_out,
        use_bias=cfg.use_bias if use_bias is None else use_bias,
        dtype=compute_dtype(cfg),
        kernel_init=nnx.initializers.normal(cfg.init_std),
        rngs=rngs,
    )


def layer_norm(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.d_model, epsilon=1e-5, dtype=compute_dtype(cfg), rngs=rngs)


def _weights(linear: nnx.Linear, dtype):
    """(kernel, bias) of a Linear as arrays in the compute dtype; bias 0 when absent."""
    bias = linear.bias[...].astype(dtype) if linear.bias is not None else jnp.zeros((), dtype)
    return linear.kernel[...].astype(dtype), bias


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention: fused qkv projection, attention, output projection."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.qkv = dense(cfg, cfg.d_model, 3 * cfg.d_model, rngs=rngs)
        self.out = dense(cfg, cfg.d_model, cfg.d_model, rngs=rngs)

    def __call__(self, x: jax.Array, *, return_intermediates: bool = False):
        *lead, T, C = x.shape
        H = self.num_heads
        qkv = self.qkv(x).reshape(*lead, T, 3, H, C // H)  # (B, T, 3, H, D)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        if not return_intermediates:
            y = F.scaled_dot_product_attention(q, k, v, causal=True)  # (B, T, H, D)
            return self.out(y.reshape(*lead, T, C))
        y, weights = F.scaled_dot_product_attention(q, k, v, causal=True, return_weights=True)
        logits = F.attention_logits(q, k)  # (B, H, T, T), recomputed only on this statistics path
        max_logit = jnp.max(jnp.where(F.causal_mask(T), logits, -jnp.inf), axis=(-2, -1))  # (B, H)
        return self.out(y.reshape(*lead, T, C)), {"weights": weights, "max_logit": max_logit}


class CausalGrassmannMixing(nnx.Module):
    """Causal Grassmann mixing (reduce, Plücker, project, gate), then an optional d x d projection."""

    def __init__(self, cfg: ModelConfig, offsets: tuple[int, ...], *, rngs: nnx.Rngs):
        d, r = cfg.d_model, cfg.rank
        self.offsets = tuple(offsets)
        self.eps = cfg.grassmann_eps
        self.dtype = compute_dtype(cfg)
        self.reduce = dense(cfg, d, r, rngs=rngs)  # W_red
        self.plucker_proj = dense(cfg, F.num_plucker_coords(r), d, rngs=rngs)  # W_plu, shared by all offsets
        self.gate = dense(cfg, 2 * d, d, rngs=rngs)  # W_gate acting on [h; g]
        self.out = dense(cfg, d, d, rngs=rngs) if cfg.grassmann_out_proj else None

    def __call__(self, x: jax.Array, *, return_intermediates: bool = False):
        w_red, b_red = _weights(self.reduce, self.dtype)
        w_plu, b_plu = _weights(self.plucker_proj, self.dtype)
        w_gate, b_gate = _weights(self.gate, self.dtype)
        result = F.grassmann_mix(
            x.astype(self.dtype),
            w_red=w_red, b_red=b_red, w_plu=w_plu, b_plu=b_plu, w_gate=w_gate, b_gate=b_gate,
            offsets=self.offsets, eps=self.eps, return_intermediates=return_intermediates,
        )
        y, intermediates = result if return_intermediates else (result, None)
        if self.out is not None:
            y = self.out(y)
        return (y, intermediates) if return_intermediates else y


class FeedForward(nnx.Module):
    """Position-wise MLP: C -> d_ff -> C with GELU, dropout on the output."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.up = dense(cfg, cfg.d_model, cfg.d_ff, rngs=rngs)
        self.down = dense(cfg, cfg.d_ff, cfg.d_model, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        return self.dropout(self.down(jax.nn.gelu(self.up(x))), deterministic=deterministic, rngs=rngs)


class Block(nnx.Module):
    """One layer: a time mixer (attention or Grassmann) and a feed-forward, pre- or post-norm."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.norm_placement = cfg.norm
        self.mixer_kind = cfg.mixer
        self.norm1 = layer_norm(cfg, rngs=rngs)
        self.norm2 = layer_norm(cfg, rngs=rngs)
        if cfg.mixer == "attention":
            self.mixer = CausalSelfAttention(cfg, rngs=rngs)
        else:
            self.mixer = CausalGrassmannMixing(cfg, cfg.layer_offsets(layer), rngs=rngs)
        self.ffn = FeedForward(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def _mix(self, x, capture):
        if capture:
            return self.mixer(x, return_intermediates=True)
        return self.mixer(x), None

    def __call__(self, x, *, deterministic: bool = True, rngs: nnx.Rngs | None = None, capture: bool = False):
        """x: (B, T, C) -> (B, T, C), plus the mixer's intermediates (or None)."""
        drop = lambda y: self.dropout(y, deterministic=deterministic, rngs=rngs)
        ffn = lambda y: self.ffn(y, deterministic=deterministic, rngs=rngs)
        if self.norm_placement == "pre":
            m, inter = self._mix(self.norm1(x), capture)
            x = x + drop(m)
            return x + ffn(self.norm2(x)), inter
        m, inter = self._mix(x, capture)
        if self.mixer_kind == "grassmann":
            # Paper: ĥ = Dropout(LN(h̃)); out = LN(ĥ + FFN(ĥ)). The gate is the mixer's residual.
            h = drop(self.norm1(m))
        else:
            h = self.norm1(x + drop(m))
        return self.norm2(h + ffn(h)), inter
