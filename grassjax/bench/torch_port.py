"""The same language models in PyTorch, for timing JAX against PyTorch on equal terms.

A line-by-line port of grassjax.nn's LanguageModel (attention or Grassmann mixing, tied head)
and of grassjax.train.optim's AdamW (warmup + cosine, decay on matrices only, clipping).
`load_params` copies a grassjax model's weights in, so both frameworks can be checked to compute
the same loss from the same weights. torch is the optional extra `pip install -e .[torch]`;
nothing in the core imports this module.
"""

from __future__ import annotations

import math

import numpy as np

from grassjax.nn.config import ModelConfig

try:
    import torch
    import torch.nn.functional as TF
    from torch import nn
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("the PyTorch comparison needs torch: pip install -e .[torch]") from err


def _rescale(u: torch.Tensor) -> torch.Tensor:
    """u times a power of two, so that max|u| is in [1/2, 1).

    As grassjax.functional.grassmann.rescale.
    """
    max_abs = u.detach().abs().amax(-1, keepdim=True)
    _, exponent = torch.frexp(max_abs)
    # A constant factor times u: torch.ldexp(u, -e) itself has a zero gradient in torch 2.13.
    return u * torch.ldexp(torch.ones_like(max_abs), -exponent)


def _norm(u: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(u, dim=-1, keepdim=True)


def grassmann_feature(z: torch.Tensor, offsets: tuple[int, ...], w_plu: torch.Tensor,
                      b_plu: torch.Tensor, eps: float,
                      pairs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """g (B, T, C) from reduced states z (B, T, r).

    The wedge collapse with the stable norm, as in JAX.
    """
    B, T, r = z.shape
    u = _rescale(z)
    u_len = _norm(u)
    a = u / torch.where(u_len > 0, u_len, torch.ones_like(u_len))  # z_t / ‖z_t‖
    w = torch.zeros_like(u)
    num_valid = torch.zeros(T, 1, dtype=u.dtype, device=u.device)
    for delta in offsets:
        if delta >= T:
            continue
        v = torch.zeros_like(u)
        v[:, delta:] = u[:, :-delta]  # z_{t-δ}, zero before the start
        v_len = _norm(v)
        c = v - torch.where((u * v).sum(-1, keepdim=True) < 0, -u, u)
        uu = (u * u).sum(-1, keepdim=True)
        d = c - (u * c).sum(-1, keepdim=True) / torch.where(uu > 0, uu, torch.ones_like(uu)) * u
        d = d / torch.where(v_len > 0, v_len, torch.ones_like(v_len))
        d_hat = d / _norm(d).clamp_min(eps)
        valid = (torch.arange(T, device=u.device) >= delta)[:, None]
        w = w + torch.where(valid, d_hat, torch.zeros_like(d_hat))
        num_valid = num_valid + valid.to(u.dtype)
    w = w / num_valid.clamp_min(1)
    i, j = pairs
    # Plücker coordinates of a ∧ w, (B, T, r(r-1)/2)
    p = a[..., i] * w[..., j] - a[..., j] * w[..., i]
    g = p @ w_plu + b_plu
    return torch.where(num_valid > 0, g, torch.zeros_like(g))


def _dropout(rate: float) -> nn.Module:
    """nn.Dropout(rate), or nothing at all at rate 0 (the timed recipes: no extra op per call)."""
    return nn.Dropout(rate) if rate > 0 else nn.Identity()


class GrassmannMixing(nn.Module):
    def __init__(self, cfg: ModelConfig, offsets: tuple[int, ...]):
        super().__init__()
        d, r = cfg.d_model, cfg.rank
        self.offsets, self.eps = tuple(offsets), cfg.grassmann_eps
        self.reduce = nn.Linear(d, r, bias=cfg.use_bias)
        self.plucker_proj = nn.Linear(r * (r - 1) // 2, d, bias=cfg.use_bias)
        self.gate = nn.Linear(2 * d, d, bias=cfg.use_bias)
        self.out = nn.Linear(d, d, bias=cfg.use_bias) if cfg.grassmann_out_proj else None
        i, j = np.triu_indices(r, 1)
        self.register_buffer("pair_i", torch.as_tensor(i), persistent=False)
        self.register_buffer("pair_j", torch.as_tensor(j), persistent=False)

    def forward(self, x):  # (B, T, C)
        z = self.reduce(x)  # (B, T, r)
        w_plu = self.plucker_proj.weight.t()
        b_plu = (self.plucker_proj.bias if self.plucker_proj.bias is not None
                 else torch.zeros_like(w_plu[0]))
        g = grassmann_feature(z, self.offsets, w_plu, b_plu, self.eps, (self.pair_i, self.pair_j))
        alpha = torch.sigmoid(self.gate(torch.cat([x, g], -1)))
        y = alpha * x + (1 - alpha) * g
        return self.out(y) if self.out is not None else y


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.attn_dropout = cfg.num_heads, cfg.attn_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.use_bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.use_bias)

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        H = self.num_heads
        # 3 x (B, H, T, D)
        q, k, v = self.qkv(x).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
        y = TF.scaled_dot_product_attention(  # nanoGPT's fused path, with its attention dropout
            q, k, v, is_causal=True, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.use_bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.use_bias)
        self.dropout = _dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.down(TF.gelu(self.up(x), approximate="tanh")))  # jax.nn.gelu's


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm_placement, self.mixer_kind = cfg.norm, cfg.mixer
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.mixer = (CausalSelfAttention(cfg) if cfg.mixer == "attention"
                      else GrassmannMixing(cfg, cfg.layer_offsets(layer)))
        self.ffn = FeedForward(cfg)
        self.dropout = _dropout(cfg.dropout)

    def forward(self, x):  # dropout where grassjax.nn.Block has it
        if self.norm_placement == "pre":
            x = x + self.dropout(self.mixer(self.norm1(x)))
            return x + self.ffn(self.norm2(x))
        m = self.mixer(x)
        h = self.dropout(self.norm1(m)) if self.mixer_kind == "grassmann" else \
            self.norm1(x + self.dropout(m))
        return self.norm2(h + self.ffn(h))


class LanguageModel(nn.Module):
    """grassjax.nn.LanguageModel in PyTorch, dropouts included (train() and eval() turn them on and
    off)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.kind != "lm" or not cfg.tie_embeddings:
            raise ValueError("the PyTorch port covers the tied-head LM")
        if cfg.mixer not in ("attention", "grassmann") or cfg.grassmann_partner_mix != "none":
            raise ValueError(f"the PyTorch port covers model.mixer=attention|grassmann "
                             f"with the paper's offset mean, "
                             f"not mixer={cfg.mixer!r}, "
                             f"grassmann_partner_mix={cfg.grassmann_partner_mix!r}")
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_layers)])
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.dropout = _dropout(cfg.dropout)

    def forward(self, tokens):  # (B, T) int64 -> logits (B, T, V)
        T = tokens.shape[1]
        positions = torch.arange(T, device=tokens.device)
        x = self.dropout(self.tok_embed(tokens) + self.pos_embed(positions))
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x) @ self.tok_embed.weight.t()  # tied head


def load_params(model: LanguageModel, params) -> None:
    """Copy a grassjax LanguageModel's parameters (nnx.state(model, nnx.Param)) into the port.

    Module names match, so the mapping is by name: kernel -> weight, embedding -> weight, LayerNorm
    scale -> weight. torch holds weights (out, in); a kernel held (in, out) (model.dense_layout
    "in_out", and the Grassmann weights always) is transposed.
    """
    import jax  # only here: the torch side of this module needs no JAX

    from grassjax.nn.layers import GRASSMANN_WEIGHTS

    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        *prefix, leaf_name = keys[:-1] if keys[-1] == "value" else keys
        in_out = model.cfg.dense_layout == "in_out" or (prefix and prefix[-1] in GRASSMANN_WEIGHTS)
        value = np.asarray(leaf).T if leaf_name == "kernel" and in_out else np.asarray(leaf)
        leaf_name = {"kernel": "weight", "embedding": "weight",
                     "scale": "weight"}.get(leaf_name, leaf_name)
        flat[".".join(prefix + [leaf_name])] = value
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name not in flat:
                raise KeyError(f"no JAX parameter for {name}")
            if tuple(flat[name].shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: JAX shape {flat[name].shape} "
                                 f"vs torch {tuple(tensor.shape)}")
            tensor.copy_(torch.as_tensor(np.ascontiguousarray(flat[name])))


def make_optimizer(model: LanguageModel, train_cfg
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW as grassjax.train.optim.

    Decay on matrices (ndim >= 2) only, warmup then cosine to min_lr.
    """
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": train_cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=train_cfg.learning_rate, betas=(train_cfg.beta1, train_cfg.beta2),
                            eps=1e-8)
    steps, warmup = int(train_cfg.steps), max(0, min(int(train_cfg.warmup_steps),
                                                     int(train_cfg.steps) - 1))
    peak, floor = float(train_cfg.learning_rate), float(train_cfg.min_lr)

    def lr_at(step):  # optax.warmup_cosine_decay_schedule, as a multiplier of the peak
        if step < warmup:
            return step / max(warmup, 1)
        progress = min(1.0, (step - warmup) / max(steps - warmup, 1))
        return (floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))) / peak

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def make_train_step(model: LanguageModel, optimizer, scheduler, *, grad_clip: float):
    """One AdamW step on (x, y): forward, cross-entropy, backward, clip, update.

    Returns the loss tensor.
    """

    def step(x, y):
        logits = model(x)
        loss = TF.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        return loss

    return step
