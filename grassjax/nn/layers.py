"""Flax NNX layers: thin wrappers that hold parameters and call grassjax.functional.

Every mixer and Block takes an optional generation cache in __call__ and returns it (as Flax's
NNX gemma does), so one forward pass serves training, statistics and streaming generation.
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


# The Grassmann mixer's dense weights, held (in, out) whatever model.dense_layout:
# grassjax.functional takes them as x @ W.
GRASSMANN_WEIGHTS = ("reduce", "plucker_proj", "gate")


class Dense(nnx.Linear):
    """nnx.Linear with its kernel stored (out, in), as PyTorch stores it: y = x Wᵀ + b.

    Initialised to exactly the values nnx.Linear would hold (same keys, same draws), transposed.
    XLA:CPU computes this layout's weight gradient (gᵀ x) faster than nnx.Linear's (xᵀ g).
    """

    def __init__(self, in_features: int, out_features: int, **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        self.kernel = nnx.Param(self.kernel[...].T)  # (out, in)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias),
                                                  dtype=self.dtype)
        # (..., in) x (out, in) -> (..., out)
        y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (1,)), ((), ())),
                                precision=self.precision)
        return y if bias is None else y + bias


def dense(cfg: ModelConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs,
          use_bias: bool | None = None, layout: str | None = None) -> nnx.Linear:
    """A dense layer with the config's N(0, init_std) init, compute dtype and kernel layout
    (`layout` overrides cfg.dense_layout: the Grassmann weights are always "in_out")."""
    cls = Dense if (layout or cfg.dense_layout) == "out_in" else nnx.Linear
    return cls(
        d_in, d_out,
        use_bias=cfg.use_bias if use_bias is None else use_bias,
        dtype=compute_dtype(cfg),
        kernel_init=nnx.initializers.normal(cfg.init_std),
        rngs=rngs,
    )


def layer_norm(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.d_model, epsilon=1e-5, dtype=compute_dtype(cfg), rngs=rngs)


def _kernel_and_bias(linear: nnx.Linear, dtype):
    """(kernel, bias) of a Linear as arrays in the compute dtype; bias 0 when absent."""
    bias = linear.bias[...].astype(dtype) if linear.bias is not None else jnp.zeros((), dtype)
    return linear.kernel[...].astype(dtype), bias


class Mixer(nnx.Module):
    """A time mixer. Subclasses give forward (whole sequence), init_cache, prefill and decode
    (streaming).

    __call__(x, cache=None) -> (y, cache, intermediates):
      no cache:       x (B, T, C), the whole sequence; intermediates (for statistics) if asked,
                      else None;
      an empty cache  (init_cache(B, max_len)) and x (B, T, C): the prompt, returning the filled
                      cache;
      a cache and     x (B, C): one position at cache["pos"], returning the cache advanced by one.
    """

    def __call__(self, x: jax.Array, cache: dict | None = None, *,
                 return_intermediates: bool = False, dropout_key: jax.Array | None = None):
        if cache is None:
            y, intermediates = self.forward(x, return_intermediates=return_intermediates,
                                            dropout_key=dropout_key)
            return y, None, intermediates
        y, cache = self.decode(x, cache) if x.ndim == 2 else self.prefill(x, cache)
        return y, cache, None


class CausalSelfAttention(Mixer):
    """Multi-head causal self-attention: fused qkv projection, attention, output projection."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.attn_dropout = cfg.attn_dropout
        self.qkv = dense(cfg, cfg.d_model, 3 * cfg.d_model, rngs=rngs)
        self.out = dense(cfg, cfg.d_model, cfg.d_model, rngs=rngs)

    def forward(self, x: jax.Array, *, return_intermediates: bool = False,
                dropout_key: jax.Array | None = None):
        *lead, T, C = x.shape
        H = self.num_heads
        qkv = self.qkv(x).reshape(*lead, T, 3, H, C // H)  # (B, T, 3, H, D)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        if not return_intermediates:
            y = F.scaled_dot_product_attention(q, k, v, causal=True, dropout_rate=self.attn_dropout,
                                               dropout_key=dropout_key)  # (B, T, H, D)
            return self.out(y.reshape(*lead, T, C)), None
        y, weights = F.scaled_dot_product_attention(q, k, v, causal=True, return_weights=True)
        logits = F.attention_logits(q, k)  # (B, H, T, T), recomputed only on this statistics path
        max_logit = jnp.max(jnp.where(F.causal_mask(T), logits, -jnp.inf), axis=(-2, -1))  # (B, H)
        return self.out(y.reshape(*lead, T, C)), {"weights": weights, "max_logit": max_logit}

    # --- Streaming generation: a key/value cache, one token per call. ---

    def _split_qkv(self, x):
        """(..., C) -> q, k, v, each (..., H, D): the same fused projection as __call__."""
        C = x.shape[-1]
        # (..., 3, H, D)
        qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, C // self.num_heads)
        return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """Empty cache: k, v (B, max_len, H, D) and pos, the number of positions filled (int32
        scalar)."""
        H = self.num_heads
        D = self.qkv.out_features // (3 * H)
        dtype = dtype or self.qkv.dtype or jnp.float32
        zeros = jnp.zeros((batch, max_len, H, D), dtype)
        return {"k": zeros, "v": zeros, "pos": jnp.zeros((), jnp.int32)}

    def prefill(self, x: jax.Array, cache: dict):
        """Causal attention over a whole prompt x (B, T, C) -> (y (B, T, C), the empty cache
        filled to T)."""
        B, T, C = x.shape
        max_len = cache["k"].shape[1]
        if T > max_len:
            raise ValueError(f"prompt length {T} exceeds the cache length max_len={max_len}")
        q, k, v = self._split_qkv(x)  # (B, T, H, D)
        y = F.scaled_dot_product_attention(q, k, v, causal=True)
        cache = {"k": cache["k"].at[:, :T].set(k.astype(cache["k"].dtype)),
                 "v": cache["v"].at[:, :T].set(v.astype(cache["v"].dtype)),
                 "pos": jnp.asarray(T, jnp.int32)}
        return self.out(y.reshape(B, T, C)), cache

    def decode(self, x_t: jax.Array, cache: dict):
        """One position: x_t (B, C) at position cache["pos"] -> (y_t (B, C), cache with k_t, v_t
        added)."""
        q, k, v = self._split_qkv(x_t)  # (B, H, D)
        pos = cache["pos"]
        write = lambda buf, new: jax.lax.dynamic_update_index_in_dim(buf, new.astype(buf.dtype),
                                                                     pos, axis=1)
        k_cache, v_cache = write(cache["k"], k), write(cache["v"], v)  # (B, max_len, H, D)
        y = F.attention_step(q, k_cache, v_cache, pos)  # (B, H, D); the mask hides rows > pos
        return self.out(y.reshape(x_t.shape)), {"k": k_cache, "v": v_cache, "pos": pos + 1}


class CausalGrassmannMixing(Mixer):
    """Causal Grassmann mixing (reduce, Plücker, project, gate), then an optional d x d
    projection."""

    def __init__(self, cfg: ModelConfig, offsets: tuple[int, ...], *, rngs: nnx.Rngs):
        d, r = cfg.d_model, cfg.rank
        self.offsets = tuple(offsets)
        self.eps = cfg.grassmann_eps
        self.dtype = compute_dtype(cfg)
        # F.grassmann_mix takes its weights as x @ W: (in, out) whatever cfg.dense_layout (the
        # names are GRASSMANN_WEIGHTS)
        self.reduce = dense(cfg, d, r, rngs=rngs, layout="in_out")  # W_red
        # W_plu, shared by all offsets
        self.plucker_proj = dense(cfg, F.num_plucker_coords(r), d, rngs=rngs, layout="in_out")
        self.gate = dense(cfg, 2 * d, d, rngs=rngs, layout="in_out")  # W_gate acting on [h; g]
        self.out = dense(cfg, d, d, rngs=rngs) if cfg.grassmann_out_proj else None
        # Order-keeping variant: M_δ = I + A_δ, one per offset (A: (m, r, r)), or its scalar
        # control M_δ = (1 + s_δ) I (s: (m,)); zeros at init, so training starts from the
        # paper's layer.
        shapes = {"per_offset": (len(self.offsets), r, r),
                  "per_offset_scalar": (len(self.offsets),)}
        mix_shape = shapes.get(cfg.grassmann_partner_mix)
        self.partner_mix = nnx.Param(jnp.zeros(mix_shape)) if mix_shape else None
        self.rank = r

    def partner_mix_matrices(self):
        """(m, r, r) matrices M_δ, or None for the paper's layer."""
        if self.partner_mix is None:
            return None
        a = self.partner_mix[...]
        eye = jnp.eye(self.rank, dtype=a.dtype)
        m = eye + a if a.ndim == 3 else (1 + a)[:, None, None] * eye
        return m.astype(self.dtype)

    def weights(self) -> F.GrassmannWeights:
        """The mixing weights in the compute dtype (the optional output projection is applied
        separately)."""
        w_red, b_red = _kernel_and_bias(self.reduce, self.dtype)
        w_plu, b_plu = _kernel_and_bias(self.plucker_proj, self.dtype)
        w_gate, b_gate = _kernel_and_bias(self.gate, self.dtype)
        return F.GrassmannWeights(w_red, b_red, w_plu, b_plu, w_gate, b_gate,
                                  self.partner_mix_matrices())

    def _project(self, y):
        return y if self.out is None else self.out(y)

    def forward(self, x: jax.Array, *, return_intermediates: bool = False, dropout_key=None):
        result = F.grassmann_mix(x.astype(self.dtype), self.weights(), offsets=self.offsets,
                                 eps=self.eps, return_intermediates=return_intermediates)
        y, intermediates = result if return_intermediates else (result, None)
        return self._project(y), intermediates

    # --- Streaming generation: only the last max(offsets) reduced states are kept. ---

    def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> dict:
        """Empty state: z (B, max(offsets), r) and pos (int32 scalar). max_len is unused: the size
        is constant."""
        z = F.init_grassmann_window((batch,), self.offsets, self.reduce.out_features,
                                    dtype or self.dtype)
        return {"z": z, "pos": jnp.zeros((), jnp.int32)}

    def prefill(self, x: jax.Array, cache: dict):
        """Mix a whole prompt x (B, T, C) -> (y (B, T, C), state after position T-1); the empty
        cache is unused."""
        # z comes out of the same computation.
        y, intermediates = self.forward(x, return_intermediates=True)
        z = F.grassmann_window_from_states(intermediates["z"], self.offsets)  # (B, M, r)
        return y, {"z": z, "pos": jnp.asarray(x.shape[-2], jnp.int32)}

    def decode(self, x_t: jax.Array, cache: dict):
        """One position: x_t (B, C) at position cache["pos"] -> (y_t (B, C), state with z_t
        pushed)."""
        y, z = F.grassmann_mix_step(x_t.astype(self.dtype), cache["z"], cache["pos"],
                                    self.weights(), offsets=self.offsets, eps=self.eps)
        return self._project(y), {"z": z, "pos": cache["pos"] + 1}


class SlidingWindowAttention(CausalSelfAttention):
    """Control mixer: causal self-attention that sees only the last `window` positions and its own.

    Same projections (and so the same parameters) as CausalSelfAttention; query t attends to keys
    t - window .. t, exactly the span a Grassmann layer with max(offsets) = window reads. Streaming
    keeps a (B, window + 1, H, D) buffer per K and V instead of a cache that grows with the context.
    No attention statistics are reported for it (its intermediates are None).
    """

    def __init__(self, cfg: ModelConfig, window: int, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.window = int(window)
        self.attn_dropout = 0.0  # a control at the CPU recipe: no dropout on its probabilities

    def forward(self, x: jax.Array, *, return_intermediates: bool = False, dropout_key=None):
        *lead, T, C = x.shape
        q, k, v = self._split_qkv(x)  # (B, T, H, D)
        return self.out(F.sliding_window_attention(q, k, v, window=self.window)
                        .reshape(*lead, T, C)), None

    def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> dict:
        """Empty buffers k, v (B, window + 1, H, D) and pos (int32 scalar); max_len is unused."""
        H = self.num_heads
        D = self.qkv.out_features // (3 * H)
        k, v = F.init_kv_window((batch,), self.window, H, D, dtype or self.qkv.dtype or jnp.float32)
        return {"k": k, "v": v, "pos": jnp.zeros((), jnp.int32)}

    def prefill(self, x: jax.Array, cache: dict):
        """x (B, T, C) -> (y (B, T, C), buffers holding the last window + 1 keys and values)."""
        B, T, C = x.shape
        q, k, v = self._split_qkv(x)
        y = self.out(F.sliding_window_attention(q, k, v, window=self.window).reshape(B, T, C))
        # The buffers hold positions T - window - 1 .. T - 1 before the next push: window + 1 rows
        # ending at T - 1.
        k_win, v_win = F.kv_window_from_states(k, v, self.window)
        return y, {"k": k_win, "v": v_win, "pos": jnp.asarray(T, jnp.int32)}

    def decode(self, x_t: jax.Array, cache: dict):
        """x_t (B, C) at position cache["pos"] -> (y_t (B, C), buffers with k_t, v_t pushed)."""
        q, k, v = self._split_qkv(x_t)  # (B, H, D)
        y, k_win, v_win = F.sliding_window_attention_step(q, k, v, cache["k"], cache["v"],
                                                          cache["pos"])
        return self.out(y.reshape(x_t.shape)), {"k": k_win, "v": v_win, "pos": cache["pos"] + 1}


class CausalConvMixing(Mixer):
    """Control mixer, attention-free: a causal depthwise convolution over time, then a d x d
    projection.

    kernel (K, C) with K = max(offsets) + 1, so position t reads t - max(offsets) .. t like a
    Grassmann layer, but with fixed per-channel weights instead of content-dependent ones; the
    projection mixes channels (as the Grassmann layer's output projection does). Streaming keeps
    the last K - 1 inputs.
    """

    def __init__(self, cfg: ModelConfig, kernel_size: int, *, rngs: nnx.Rngs):
        self.dtype = compute_dtype(cfg)
        self.kernel = nnx.Param(nnx.initializers.normal(cfg.init_std)(rngs.params(),
                                                                      (kernel_size, cfg.d_model)))
        self.bias = nnx.Param(jnp.zeros((cfg.d_model,))) if cfg.use_bias else None
        self.out = dense(cfg, cfg.d_model, cfg.d_model, rngs=rngs)

    def _weights(self):
        bias = None if self.bias is None else self.bias[...].astype(self.dtype)
        return self.kernel[...].astype(self.dtype), bias

    def forward(self, x: jax.Array, *, return_intermediates: bool = False, dropout_key=None):
        kernel, bias = self._weights()
        return self.out(F.causal_depthwise_conv(x.astype(self.dtype), kernel=kernel,
                                                bias=bias)), None

    def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> dict:
        """Empty buffer x (B, K - 1, C) and pos (int32 scalar); max_len is unused."""
        K, C = self.kernel.shape
        return {"x": F.init_conv_window((batch,), K, C, dtype or self.dtype),
                "pos": jnp.zeros((), jnp.int32)}

    def prefill(self, x: jax.Array, cache: dict):
        """x (B, T, C) -> (y (B, T, C), buffer of the last K - 1 inputs)."""
        x = x.astype(self.dtype)
        window = F.conv_window_from_states(x, self.kernel.shape[0])
        return self.forward(x)[0], {"x": window, "pos": jnp.asarray(x.shape[-2], jnp.int32)}

    def decode(self, x_t: jax.Array, cache: dict):
        """x_t (B, C) at position cache["pos"] -> (y_t (B, C), buffer with x_t pushed)."""
        kernel, bias = self._weights()
        y, window = F.causal_conv_step(x_t.astype(self.dtype), cache["x"], kernel=kernel, bias=bias)
        return self.out(y), {"x": window, "pos": cache["pos"] + 1}


class FeedForward(nnx.Module):
    """Position-wise MLP: C -> d_ff -> C with GELU, dropout on the output."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.up = dense(cfg, cfg.d_model, cfg.d_ff, rngs=rngs)
        self.down = dense(cfg, cfg.d_ff, cfg.d_model, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        return self.dropout(self.down(jax.nn.gelu(self.up(x))), deterministic=deterministic,
                            rngs=rngs)


def _drops_attention(mixer) -> bool:
    """Whether `mixer` drops attention probabilities out."""
    return getattr(mixer, "attn_dropout", 0.0) > 0


class Block(nnx.Module):
    """One layer: a time mixer (attention, Grassmann or a local control) and a feed-forward,
    pre- or post-norm."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.norm_placement = cfg.norm
        self.mixer_kind = cfg.mixer
        self.norm1 = layer_norm(cfg, rngs=rngs)
        self.norm2 = layer_norm(cfg, rngs=rngs)
        if cfg.mixer == "attention":
            self.mixer = CausalSelfAttention(cfg, rngs=rngs)
        elif cfg.mixer == "sliding_window":  # control: attention over a Grassmann layer's span
            self.mixer = SlidingWindowAttention(cfg, max(cfg.layer_offsets(layer)), rngs=rngs)
        elif cfg.mixer == "conv":  # control: attention-free, fixed weights over the same span
            self.mixer = CausalConvMixing(cfg, max(cfg.layer_offsets(layer)) + 1, rngs=rngs)
        else:
            self.mixer = CausalGrassmannMixing(cfg, cfg.layer_offsets(layer), rngs=rngs)
        self.ffn = FeedForward(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x, cache: dict | None = None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None, return_intermediates: bool = False):
        """x (B, T, C) -> (out (B, T, C), the mixer's cache, its intermediates); see Mixer for
        the cache.

        Generation calls it with a cache and x (B, T, C) (the prompt) or (B, C) (one position);
        dropout is then off.
        """
        drop = lambda y: self.dropout(y, deterministic=deterministic, rngs=rngs)
        ffn = lambda y: self.ffn(y, deterministic=deterministic, rngs=rngs)
        # The attention probabilities' dropout draws its own key (only where it is on: the others'
        # keys, and so every run without it, are as before).
        key = None
        if not deterministic and rngs is not None and _drops_attention(self.mixer):
            key = rngs.dropout()
        mix = lambda h: self.mixer(h, cache, return_intermediates=return_intermediates,
                                   dropout_key=key)
        if self.norm_placement == "pre":
            m, cache, inter = mix(self.norm1(x))
            x = x + drop(m)
            return x + ffn(self.norm2(x)), cache, inter
        m, cache, inter = mix(x)
        if self.mixer_kind == "grassmann":
            # Paper: ĥ = Dropout(LN(h̃)); out = LN(ĥ + FFN(ĥ)). The gate is the mixer's
            # residual.
            h = drop(self.norm1(m))
        else:
            h = self.norm1(x + drop(m))
        return self.norm2(h + ffn(h)), cache, inter

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        return self.mixer.init_cache(batch, max_len, dtype)
