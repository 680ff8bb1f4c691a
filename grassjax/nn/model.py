"""Language models: a bigram baseline and the N-block LM (attention, Grassmann or a local control).

Every model maps tokens (B, T) int32 to logits (B, T, V) float32 and takes the
same keyword arguments, so one training loop serves them all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from grassjax import functional as F
from grassjax.nn.config import ModelConfig
from grassjax.nn.layers import Block, compute_dtype, dense, layer_norm


class LanguageModel(nnx.Module):
    """Token + learned position embeddings, N blocks, final LayerNorm, tied head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        embed_init = nnx.initializers.normal(cfg.init_std)
        dtype = compute_dtype(cfg)
        self.tok_embed = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=embed_init,
                                   dtype=dtype, rngs=rngs)
        self.pos_embed = nnx.Embed(cfg.block_size, cfg.d_model, embedding_init=embed_init,
                                   dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = layer_norm(cfg, rngs=rngs)
        # Tied by default: the head reuses tok_embed (no bias), as in GPT-2 and the paper's counts.
        self.head = None if cfg.tie_embeddings else dense(cfg, cfg.d_model, cfg.vocab_size,
                                                          rngs=rngs, use_bias=False)

    def __call__(self, tokens, *, deterministic: bool = True, rngs: nnx.Rngs | None = None,
                 return_intermediates: bool = False):
        """tokens (B, T) int -> logits (B, T, V) float32.

        With return_intermediates=True also returns a list with one dict per
        block: the mixer's intermediates (attention weights, or Grassmann gate,
        norms, ...), for statistics.
        """
        x, _, intermediates = self.hidden(tokens, deterministic=deterministic, rngs=rngs,
                                          return_intermediates=return_intermediates)
        logits = self.logits(x)
        return (logits, intermediates) if return_intermediates else logits

    def hidden(self, tokens, caches: list[dict] | None = None, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None, return_intermediates: bool = False):
        """Embeddings and blocks, before the final norm: (x, caches, intermediates).

        Without caches: tokens (B, T), positions 0..T-1. With caches (generation, one per block,
        see Block): tokens (B, T) is a prompt at positions 0..T-1 filling empty caches, tokens (B,)
        one token at position caches[0]["pos"].
        """
        if tokens.ndim == 1:  # one position, streaming
            positions = caches[0]["pos"]
        else:
            T = tokens.shape[1]
            if T > self.cfg.block_size:
                raise ValueError(f"sequence length {T} exceeds "
                                 f"model.block_size={self.cfg.block_size}")
            positions = jnp.arange(T)
        x = self.tok_embed(tokens) + self.pos_embed(positions)  # (B, T, C) or (B, C)
        x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        intermediates, new_caches = [], []
        for block, cache in zip(self.blocks, caches or [None] * len(self.blocks)):
            x, cache, inter = block(x, cache, deterministic=deterministic, rngs=rngs,
                                    return_intermediates=return_intermediates)
            intermediates.append(inter)
            new_caches.append(cache)
        return x, (new_caches if caches is not None else None), intermediates

    def logits(self, x):
        """Final norm and head: (..., C) -> (..., V) float32."""
        x = self.final_norm(x)
        logits = self.tok_embed.attend(x) if self.head is None else self.head(x)
        return logits.astype(jnp.float32)  # the loss wants full precision even under bfloat16


class BigramLanguageModel(nnx.Module):
    """Next-token logits read straight from a (V, V) table: the floor any LM must beat."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.table = nnx.Embed(cfg.vocab_size, cfg.vocab_size,
                               embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)

    def __call__(self, tokens, *, deterministic: bool = True, rngs: nnx.Rngs | None = None,
                 return_intermediates: bool = False):
        logits = self.table(tokens).astype(jnp.float32)  # (B, T, V)
        return (logits, []) if return_intermediates else logits


def build_model(cfg: ModelConfig, *, seed: int = 0):
    """The model named by cfg.kind, initialised from `seed`."""
    rngs = nnx.Rngs(params=seed)
    return (BigramLanguageModel(cfg, rngs=rngs) if cfg.kind == "bigram"
            else LanguageModel(cfg, rngs=rngs))


def param_counts(model: nnx.Module) -> dict[str, int]:
    """Exact parameter counts: total, and non-embedding (without token and position tables)."""
    size = lambda module: sum(int(x.size)
                              for x in jax.tree_util.tree_leaves(nnx.state(module, nnx.Param)))
    total = size(model)  # works on nnx.eval_shape'd models too: only shapes are read
    embedding = sum(size(getattr(model, name)) for name in ("tok_embed", "pos_embed", "table")
                    if hasattr(model, name))
    return {"total": total, "non_embedding": total - embedding}


def analytic_param_count(cfg: ModelConfig) -> int:
    """The same total, from the formula (used to check the modules and to size experiments)."""
    V, C, L, F_, r = cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.d_ff, cfg.rank
    b = 1 if cfg.use_bias else 0
    if cfg.kind == "bigram":
        return V * V
    linear = lambda i, o: i * o + b * o

    def mixer(layer):
        if cfg.mixer in ("attention", "sliding_window"):
            return linear(C, 3 * C) + linear(C, C)
        if cfg.mixer == "conv":  # (K, C) kernel + bias, then the d x d projection
            return (max(cfg.layer_offsets(layer)) + 1) * C + b * C + linear(C, C)
        grassmann = linear(C, r) + linear(F.num_plucker_coords(r), C) + linear(2 * C, C)
        if cfg.grassmann_partner_mix == "per_offset":  # one r x r matrix per offset of the layer
            grassmann += len(cfg.layer_offsets(layer)) * r * r
        elif cfg.grassmann_partner_mix == "per_offset_scalar":  # one weight per offset
            grassmann += len(cfg.layer_offsets(layer))
        return grassmann + (linear(C, C) if cfg.grassmann_out_proj else 0)

    ffn_and_norms = linear(C, F_) + linear(F_, C) + 2 * 2 * C  # + two LayerNorms
    head = 0 if cfg.tie_embeddings else V * C
    return (V * C + cfg.block_size * C + sum(mixer(i) + ffn_and_norms for i in range(L)) + 2 * C
            + head)
