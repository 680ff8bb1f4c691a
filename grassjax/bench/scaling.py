"""Benchmark: how step time scales with sequence length T, attention vs Grassmann mixing.

Two series at constant tokens per step: one mixing layer alone (fwd+bwd) and the whole LM train
step (`make_train_step`). Per point: compile time, median step time (IQR), tokens/s, XLA FLOPs,
peak memory and MFU against a matmul peak timed in the same run. What each series and column
means: docs/speed.md.
"""

from __future__ import annotations

import math
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from grassjax import functional as F
from grassjax.bench import timing
from grassjax.compiled import compiled_flops, compiled_memory
from grassjax.nn import ModelConfig, build_model, param_counts
from grassjax.train.optim import make_optimizer, train_hparams
from grassjax.runlog import RunLogger
from grassjax.runlog.records import write_json
from grassjax.train.step import init_train_state, make_train_step

MIB = 2**20
# attention_cudnn: jax.nn's cuDNN flash attention, on an NVIDIA GPU in bfloat16/float16 only.
MIXERS = ("attention", "attention_jax_nn", "attention_cudnn", "attention_explicit",
          "grassmann_reference", "grassmann")
LM_MIXERS = ("attention", "grassmann")


def _dtype(name: str):
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"bench.dtype must be float32 or bfloat16, got {name!r}")
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


# --------------------------------------------------------------------------------------------------
# Mixers alone
# --------------------------------------------------------------------------------------------------

def mixer_params(kind: str, d: int, r: int, seed: int = 0,
                 dtype=jnp.float32) -> dict[str, jax.Array]:
    """Random weights for one mixing layer (N(0, 1/fan_in) matrices, small biases).

    Drawn with NumPy: eager jax.random calls would compile one program per shape.
    """
    rng = np.random.default_rng(seed)
    normal = lambda shape, fan_in: jnp.asarray(
        rng.standard_normal(shape, np.float32) / math.sqrt(fan_in), dtype)
    if kind.startswith("attention"):
        return dict(w_qkv=normal((d, 3 * d), d), b_qkv=normal((3 * d,), 1e4),
                    w_out=normal((d, d), d), b_out=normal((d,), 1e4))
    P = F.num_plucker_coords(r)
    return dict(w_red=normal((d, r), d), b_red=normal((r,), 1e4),
                w_plu=normal((P, d), P), b_plu=normal((d,), 1e4),
                w_gate=normal((2 * d, d), 2 * d), b_gate=normal((d,), 1e4))


def mixer_fn(kind: str, *, num_heads: int, offsets: tuple[int, ...]) -> Callable:
    """mixer(x, params) -> (B, T, d) for one of MIXERS."""
    if kind in ("attention", "attention_jax_nn", "attention_cudnn", "attention_explicit"):

        def attention(x, p):
            *lead, T, C = x.shape
            qkv = (x @ p["w_qkv"] + p["b_qkv"]).reshape(*lead, T, 3, num_heads, C // num_heads)
            q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
            if kind == "attention_explicit":
                y = F.scaled_dot_product_attention(q, k, v, causal=True, return_weights=True)[0]
            elif kind in ("attention_jax_nn", "attention_cudnn"):
                y = jax.nn.dot_product_attention(
                    q, k, v, is_causal=True,
                    implementation="cudnn" if kind == "attention_cudnn" else None)
            else:
                y = F.scaled_dot_product_attention(q, k, v, causal=True)
            return y.reshape(*lead, T, C) @ p["w_out"] + p["b_out"]

        return attention
    if kind == "grassmann_reference":
        return lambda x, p: F.grassmann_mix_reference(x, offsets=offsets, **p)
    if kind == "grassmann":
        return lambda x, p: F.grassmann_mix(x, offsets=offsets, **p)
    raise ValueError(f"unknown mixer {kind!r}; valid: {MIXERS}")


def _fwd_bwd(mixer: Callable):
    """jit(value_and_grad) of sum(mixer(x, params)) w.r.t. params and x."""
    loss = lambda params, x: mixer(x, params).astype(jnp.float32).sum()
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _adaptive_reps(first_call_s: float, reps: int, min_reps: int, budget_s: float) -> int:
    """`reps`, cut down (not below min_reps) so one point stays near budget_s seconds."""
    if budget_s <= 0 or first_call_s <= 0:
        return reps
    return int(max(min(reps, min_reps), min(reps, budget_s // first_call_s)))


class _Point:
    """One (series, mixer, T) measurement.

    Compiled once, then called in rounds with the other points.
    """

    def __init__(self, row: dict, jitted, args: tuple, *, stateful: bool):
        self.row, self.jitted, self.args, self.stateful = row, jitted, tuple(args), stateful
        self.samples: list[float] = []

    def prepare(self, *, reps: int, warmup: int, min_reps: int, budget_s: float) -> None:
        comp = timing.compile_timed(self.jitted, *self.args)
        self.exe, self.compile = comp.executable, comp
        t0 = time.perf_counter()
        self._call()  # first call (also the first warm-up) sizes the number of reps
        self.first_s = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            self._call()
        self.reps = _adaptive_reps(self.first_s, reps, min_reps, budget_s)

    def _call(self):
        if self.stateful:
            state, aux = self.exe(*self.args)
            jax.block_until_ready(aux)
            self.args = (state,) + self.args[1:]
        else:
            jax.block_until_ready(self.exe(*self.args))

    def timed_call(self, settle_max_s: float = 0.0) -> None:
        if self.first_s <= settle_max_s:
            # untimed: lets caches and the allocator recover from the point timed before
            self._call()
        t0 = time.perf_counter()
        self._call()
        self.samples.append(time.perf_counter() - t0)

    def finish(self, peak_flops: float) -> dict:
        t = timing.Timing.from_samples(self.samples)
        exe, tokens = self.exe, self.row["tokens"]
        flops = compiled_flops(exe)
        mem, mem_source = timing.peak_memory_bytes(exe)
        static_mem = compiled_memory(exe)
        self.row.update(
            step_ms=1e3 * t.median_s, p25_ms=1e3 * t.p25_s, p75_ms=1e3 * t.p75_s,
            min_ms=1e3 * t.min_s, max_ms=1e3 * t.max_s, reps=t.reps,
            first_call_ms=1e3 * self.first_s,
            lower_s=self.compile.lower_s, compile_s=self.compile.compile_s,
            tokens_per_s=tokens / t.median_s,
            gflops_per_step=None if flops is None else flops / 1e9,
            achieved_gflops_per_s=None if flops is None else flops / t.median_s / 1e9,
            mfu=None if (flops is None or not peak_flops) else flops / t.median_s / peak_flops,
            peak_mem_mib=None if mem is None else mem / MIB, peak_mem_source=mem_source,
            temp_mem_mib=None if static_mem is None else static_mem["temp_bytes"] / MIB,
        )
        self.exe = self.jitted = self.args = None  # free buffers before the next series
        return self.row


def _run_points(points: list[_Point], bc, *, peak_flops: float, print_fn=print) -> list[dict]:
    """Compile and warm every point, then time them round-robin, one call each per round.

    Interleaving spreads any drift in machine load (a shared CPU) over all
    points alike, so ratios between points -- across T and across mixers --
    are far steadier than with one point timed after another. Points that
    take at most bench.settle_max_s get one untimed call right before each
    timed one: without it, a short point timed just after a long, memory-heavy
    one (attention at the largest T) reads slow.
    """
    for p in points:
        p.prepare(reps=int(bc.reps), warmup=int(bc.warmup), min_reps=int(bc.min_reps),
                  budget_s=float(bc.point_budget_s))
        r = p.row
        print_fn(f"  compiled {r['series']} {r['mixer']} T={r['T']}: {p.compile.compile_s:.1f}s, "
                 f"first call {1e3 * p.first_s:.1f} ms -> {p.reps} reps")
    while any(len(p.samples) < p.reps for p in points):
        for p in points:
            if len(p.samples) < p.reps:
                p.timed_call(float(bc.get("settle_max_s", 0.0)))
    rows = [p.finish(peak_flops) for p in points]
    for row in rows:
        print_fn(_row_line(row))
    return rows


def bench_mixers(bc, *, peak_flops: float, print_fn=print) -> list[dict]:
    dtype = _dtype(bc.dtype)
    d, r, H = int(bc.mixer_d), int(bc.mixer_rank), int(bc.mixer_heads)
    offsets = tuple(int(o) for o in bc.mixer_offsets)
    if d % H:
        raise ValueError(f"bench.mixer_d ({d}) must be divisible by bench.mixer_heads ({H})")
    points = []
    for kind in bc.mixers:
        params = mixer_params(kind, d, r, 0, dtype)
        n_params = sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
        fn = _fwd_bwd(mixer_fn(kind, num_heads=H, offsets=offsets))
        for T in sorted(int(t) for t in bc.mixer_seq_lens):
            B = max(1, int(bc.mixer_tokens_per_step) // T)
            x = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, d), np.float32), dtype)
            row = dict(series="mixer", mixer=kind, T=T, batch=B, tokens=B * T, d=d, rank=r,
                       params=n_params, tokens_constant=B * T == int(bc.mixer_tokens_per_step))
            points.append(_Point(row, fn, (params, x), stateful=False))
    return _run_points(points, bc, peak_flops=peak_flops, print_fn=print_fn)


# --------------------------------------------------------------------------------------------------
# Whole LM train step
# --------------------------------------------------------------------------------------------------

def lm_model_config(config: ml_collections.ConfigDict, mixer: str, block_size: int) -> ModelConfig:
    values = {**config.model.to_dict(), "mixer": mixer, "kind": "lm",
              "vocab_size": int(config.bench.vocab_size), "block_size": block_size,
              "dtype": config.bench.dtype}
    return ModelConfig.from_mapping(values)


def lm_setup(config, mixer: str, T: int, B: int):
    """The LM with `mixer` at block T from config.model, its train step, a state and a batch.

    Returns (model config, parameter count, step, state, args): the jitted train step, a fresh
    train state and one random (B, T) batch, where step(state, *args) is one train step
    (args = (x, y, hparams)).
    """
    mc = lm_model_config(config, mixer, T)
    model = build_model(mc, seed=int(config.train.seed))
    n_params = param_counts(model)["total"]
    graphdef, params = nnx.split(model, nnx.Param)
    hparams = train_hparams(config.train)
    state = init_train_state(params, hparams)
    step = make_train_step(graphdef, dropout=max(mc.dropout, mc.attn_dropout))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, mc.vocab_size, (B, T)), jnp.int32)
    y = jnp.asarray(rng.integers(0, mc.vocab_size, (B, T)), jnp.int32)
    return mc, n_params, step, state, (x, y, hparams)


def bench_lm(config, *, peak_flops: float, print_fn=print) -> list[dict]:
    bc = config.bench
    points = []
    for mixer in bc.lm_mixers:
        for T in sorted(int(t) for t in bc.lm_seq_lens):
            B = max(1, int(bc.lm_tokens_per_step) // T)
            mc, n_params, step, state, args = lm_setup(config, mixer, T, B)
            row = dict(series="lm", mixer=mixer, T=T, batch=B, tokens=B * T, d=mc.d_model,
                       rank=mc.rank, layers=mc.num_layers, params=n_params,
                       tokens_constant=B * T == int(bc.lm_tokens_per_step))
            points.append(_Point(row, step, (state, *args), stateful=True))
    return _run_points(points, bc, peak_flops=peak_flops, print_fn=print_fn)


def compare_nnx_jit(config, *, T: int, reps: int, print_fn=print) -> dict[str, Any]:
    """Grassmann-LM train step at the CPU config: functional split/merge inside jax.jit (what
    `make_train_step` does) vs `nnx.jit` on the module with `nnx.cached_partial`.

    Both run the same maths (AdamW via optax inside the step); timings are interleaved
    call by call so that load on a shared machine hits both alike.
    """
    from grassjax.train.step import cross_entropy

    B = max(1, int(config.bench.lm_tokens_per_step) // T)
    out = {"T": T, "batch": B}
    for mixer in config.bench.lm_mixers:
        mc, _, step, state, args = lm_setup(config, mixer, T, B)
        functional = step.lower(state, *args).compile()
        x, y, hparams = args

        model = build_model(mc, seed=int(config.train.seed))
        optimizer = nnx.Optimizer(model, make_optimizer(hparams), wrt=nnx.Param)

        @nnx.jit(donate_argnums=(0, 1))
        def nnx_step(model, optimizer, x, y):
            loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
            optimizer.update(model, grads)
            return loss

        cached = nnx.cached_partial(nnx_step, model, optimizer)
        for _ in range(2):
            jax.block_until_ready(cached(x, y))
            state, m = functional(state, *args)
            jax.block_until_ready(m)
        t_fun, t_nnx = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            state, m = functional(state, *args)
            jax.block_until_ready(m)
            t1 = time.perf_counter()
            jax.block_until_ready(cached(x, y))
            t2 = time.perf_counter()
            t_fun.append(t1 - t0)
            t_nnx.append(t2 - t1)
        a, b = timing.Timing.from_samples(t_fun), timing.Timing.from_samples(t_nnx)
        out[mixer] = {"split_merge_in_jax_jit": a.as_dict(),
                      "nnx_jit_cached_partial": b.as_dict(),
                      "nnx_over_functional": b.median_s / a.median_s}
        print_fn(f"  {mixer} LM T={T} B={B}: split/merge in jax.jit {a} | "
                 f"nnx.jit + cached_partial {b} "
                 f"-> nnx/functional {b.median_s / a.median_s:.3f}")
    return out


# --------------------------------------------------------------------------------------------------
# Ratios, targets, report
# --------------------------------------------------------------------------------------------------

def _lookup(rows, series, mixer, T, key="step_ms"):
    for row in rows:
        if row["series"] == series and row["mixer"] == mixer and row["T"] == T:
            return row[key]
    return None


def _div(a, b):
    return None if a is None or b is None or b == 0 else a / b


def compute_ratios(rows: list[dict], bc) -> dict[str, Any]:
    ratio_T = int(bc.ratio_T)
    lm_short, lm_long = (int(t) for t in bc.lm_ratio_T)
    ratios: dict[str, Any] = {}
    ratios["grassmann_vs_reference_speedup"] = {
        "T": ratio_T,
        "value": _div(_lookup(rows, "mixer", "grassmann_reference", ratio_T),
                      _lookup(rows, "mixer", "grassmann", ratio_T)),
        "flop_ratio": _div(_lookup(rows, "mixer", "grassmann_reference", ratio_T,
                                   "gflops_per_step"),
                           _lookup(rows, "mixer", "grassmann", ratio_T, "gflops_per_step")),
        "note": ("reference median step time / grassmann_mix median step time, fwd+bwd, "
                 "mixer alone"),
    }
    for T in (lm_short, lm_long):
        ratios[f"lm_grassmann_over_attention_T{T}"] = {
            "T": T,
            "value": _div(_lookup(rows, "lm", "grassmann", T),
                          _lookup(rows, "lm", "attention", T)),
            "note": ("Grassmann LM train-step time / attention LM train-step time "
                     "(< 1: Grassmann faster)"),
        }
    lo, hi = (int(t) for t in bc.flat_T)

    def flatness(series, mixer):
        pts = [(row["T"], row["step_ms"]) for row in rows
               if row["series"] == series and row["mixer"] == mixer
               and lo <= row["T"] <= hi and row["tokens_constant"]]
        if len(pts) < 2:
            return None
        times = [t for _, t in pts]
        return {"value": max(times) / min(times), "T": [T for T, _ in pts], "step_ms": times}

    lm_flat = flatness("lm", "grassmann")
    mixer_flat = flatness("mixer", "grassmann")
    source = ("lm" if lm_flat is not None and lm_flat["T"][-1] >= hi and lm_flat["T"][0] <= lo
              else "mixer")
    chosen = lm_flat if source == "lm" else mixer_flat
    ratios["grassmann_flatness"] = {
        "T_range": [lo, hi], "source": source,
        "value": None if chosen is None else chosen["value"],
        "mixer_alone": mixer_flat, "lm": lm_flat,
        "attention_mixer_alone": flatness("mixer", "attention"),
        "note": ("max/min Grassmann step time over T in range at constant tokens/step; "
                 + ("from the LM series" if source == "lm" else
                    "the LM series cannot keep tokens/step constant over this range "
                    "(batch >= 1), so this is the mixer-alone series")),
    }
    # LM per-token time where the batch could not shrink further (supplementary).
    per_token = {}
    for mixer in bc.lm_mixers:
        pts = {row["T"]: 1e3 * row["step_ms"] / row["tokens"] for row in rows
               if row["series"] == "lm" and row["mixer"] == mixer}
        per_token[mixer] = pts
    ratios["lm_us_per_token"] = per_token
    # Where the Grassmann mixer overtakes each attention: the smallest T from which it is faster
    # at every T measured.
    crossover = {}
    for kind in sorted({row["mixer"] for row in rows
                        if row["series"] == "mixer" and row["mixer"].startswith("attention")}):
        Ts = sorted(row["T"] for row in rows if row["series"] == "mixer" and row["mixer"] == kind)
        ratio = {T: _div(_lookup(rows, "mixer", "grassmann", T), _lookup(rows, "mixer", kind, T))
                 for T in Ts}
        faster = {T for T, r in ratio.items() if r is not None and r < 1.0}
        from_T = next((T for T in Ts if faster >= {t for t in Ts if t >= T}), None)
        crossover[kind] = {"from_T": from_T, "T_measured": Ts, "grassmann_over_attention": ratio}
    ratios["grassmann_mixer_crossover"] = crossover
    return ratios


def evaluate_targets(ratios: dict, bc) -> list[dict]:
    t = bc.targets
    speed = ratios["grassmann_vs_reference_speedup"]["value"]
    lm_short, lm_long = (int(x) for x in bc.lm_ratio_T)
    short = ratios[f"lm_grassmann_over_attention_T{lm_short}"]["value"]
    long_ = ratios[f"lm_grassmann_over_attention_T{lm_long}"]["value"]
    flat = ratios["grassmann_flatness"]["value"]
    check = lambda value, ok: None if value is None else bool(ok(value))
    return [
        dict(target=(f"grassmann_mix >= {t.min_speedup_vs_reference}x faster than reference "
                     f"at T={bc.ratio_T}"),
             measured=speed, met=check(speed, lambda v: v >= t.min_speedup_vs_reference)),
        dict(target=f"Grassmann LM no slower than attention LM at T={lm_short} (ratio <= 1)",
             measured=short, met=check(short, lambda v: v <= 1.0)),
        dict(target=(f"Grassmann LM >= {t.min_lm_speedup_long}x faster than attention LM "
                     f"at T={lm_long}"),
             measured=None if long_ is None else 1.0 / long_,
             met=check(long_, lambda v: 1.0 / v >= t.min_lm_speedup_long)),
        dict(target=(f"Grassmann step time flat within {t.max_flatness}x "
                     f"over T={bc.flat_T[0]}..{bc.flat_T[1]} "
                     f"({ratios['grassmann_flatness']['source']} series)"),
             measured=flat, met=check(flat, lambda v: v <= t.max_flatness)),
    ]


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def _row_line(row: dict) -> str:
    warn = "" if row["tokens_constant"] else " (tokens/step not constant: batch 1)"
    return (f"  {row['series']:5s} {row['mixer']:19s} T={row['T']:5d} B={row['batch']:4d} "
            f"{row['step_ms']:9.2f} ms "
            f"[IQR {row['p25_ms']:.2f}-{row['p75_ms']:.2f}, n={row['reps']}] "
            f"{row['tokens_per_s']:10.0f} tok/s  compile {row['compile_s']:5.1f}s  "
            f"{_fmt(row['gflops_per_step'])} GFLOP  MFU {_fmt(row['mfu'], '.3f')}  "
            f"mem {_fmt(row['peak_mem_mib'], '.1f')} MiB{warn}")


def format_table(rows: list[dict], series: str) -> str:
    rows = [r for r in rows if r["series"] == series]
    if not rows:
        return ""
    head = ("| mixer | T | batch | tokens | step ms (median) | IQR ms | min-max ms | tokens/s | "
            "compile s | GFLOP/step | MFU | peak mem MiB |")
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for r in rows:
        tokens = f"{r['tokens']}" + ("" if r["tokens_constant"] else "*")
        lines.append(f"| {r['mixer']} | {r['T']} | {r['batch']} | {tokens} | {r['step_ms']:.2f} | "
                     f"{r['p25_ms']:.2f}-{r['p75_ms']:.2f} | {r['min_ms']:.2f}-{r['max_ms']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['compile_s']:.1f} | "
                     f"{_fmt(r['gflops_per_step'])} | "
                     f"{_fmt(r['mfu'], '.3f')} | {_fmt(r['peak_mem_mib'], '.1f')} |")
    if any(not r["tokens_constant"] for r in rows):
        lines.append("\n\\* batch is already 1: "
                     "tokens per step could not be kept constant at this T.")
    return "\n".join(lines)


def format_summary(ratios: dict, targets: list[dict]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for t in targets:
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"| {t['target']} | {_fmt(t['measured'], '.3f')} | {met} |")
    fl = ratios["grassmann_flatness"]
    lines.append("")
    lines.append("grassmann_mix vs reference FLOP ratio (XLA cost analysis) "
                 f"at T={ratios['grassmann_vs_reference_speedup']['T']}: "
                 f"{_fmt(ratios['grassmann_vs_reference_speedup']['flop_ratio'])}x")
    lines.append(f"flatness: {fl['note']}")
    if fl.get("attention_mixer_alone"):
        lines.append("  (attention mixer alone over the same range: "
                     f"{fl['attention_mixer_alone']['value']:.2f}x)")
    for kind, c in ratios.get("grassmann_mixer_crossover", {}).items():
        where = (f"from T={c['from_T']} on" if c["from_T"] is not None
                 else f"at no T up to {max(c['T_measured'])}")
        lines.append(f"grassmann_mix faster than {kind} (mixer alone) {where}")
    return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [s for s in ("mixer", "lm") if any(r["series"] == s for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(series)), figsize=(6.5 * max(1, len(series)), 4.6),
                             squeeze=False)
    titles = {"mixer": "one mixing layer, fwd+bwd", "lm": "LM train step (AdamW)"}
    for ax, s in zip(axes[0], series):
        mixers = list(dict.fromkeys(r["mixer"] for r in rows if r["series"] == s))
        for m in mixers:
            pts = sorted((r["T"], r["step_ms"], r["p25_ms"], r["p75_ms"]) for r in rows
                         if r["series"] == s and r["mixer"] == m)
            T = [p[0] for p in pts]
            ax.plot(T, [p[1] for p in pts], marker="o", label=m)
            ax.fill_between(T, [p[2] for p in pts], [p[3] for p in pts], alpha=0.2)
        tokens = sorted({r["tokens"] for r in rows if r["series"] == s})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (batch = tokens/step / T)")
        ax.set_ylabel("step time, ms (median, IQR band)")
        ax.set_title(f"{titles[s]}; tokens/step {tokens[0]}"
                     + ("" if len(tokens) == 1 else f"..{tokens[-1]}"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig



def run_scaling_benchmark(config: ml_collections.ConfigDict, *, workdir, exp_name: str,
                          data_dir=None, wandb_mode: str | None = None) -> dict:
    """Run the benchmark described by config.bench.

    Returns the results dict also written to results.json. data_dir is unused (no data is read:
    inputs are random tokens / activations).
    """
    del data_dir
    bc = config.bench
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    info = timing.machine_info()
    logger = RunLogger(workdir=workdir, project=config.wandb.project,
                       name=config.wandb.name or exp_name, group=config.wandb.group or None,
                       tags=list(config.wandb.tags) + ["benchmark", "scaling"],
                       config=config.to_dict(), mode=wandb_mode, job_type="benchmark",
                       print_fn=print)
    try:
        print(f"{exp_name}: {info.get('cpu_model', info['device_kind'])} ({info['backend']}, "
              f"{info['cpu_count']} CPUs, JAX {info['jax_version']}), dtype {bc.dtype}, "
              f"load average {info.get('load_avg_1m', float('nan')):.2f}")
        peak = timing.measure_matmul_peak(int(bc.matmul_n), _dtype(bc.dtype),
                                          reps=int(bc.matmul_reps))
        print(f"matmul peak ({bc.matmul_n}^3 {peak.dtype}): "
              f"{peak.flops_per_s / 1e9:.1f} GFLOP/s best, "
              f"{peak.median_flops_per_s / 1e9:.1f} median")
        rows: list[dict] = []
        if bc.run_mixers:
            print(f"mixer alone: d={bc.mixer_d}, r={bc.mixer_rank}, "
                  f"offsets={tuple(bc.mixer_offsets)}, "
                  f"{bc.mixer_heads} heads, {bc.mixer_tokens_per_step} tokens/step, "
                  "fwd+bwd (grads of params and x)")
            rows += bench_mixers(bc, peak_flops=peak.flops_per_s)
        if bc.run_lm:
            m = config.model
            print(f"LM train step: {m.num_layers} layers, d={m.d_model}, r={m.rank}, "
                  f"{m.num_heads} heads, "
                  f"{bc.lm_tokens_per_step} tokens/step, make_train_step (AdamW)")
            rows += bench_lm(config, peak_flops=peak.flops_per_s)
        nnx_cmp = None
        if bc.compare_nnx_jit:
            print("nnx split/merge inside jax.jit vs nnx.jit + nnx.cached_partial (interleaved):")
            nnx_cmp = compare_nnx_jit(config, T=int(bc.nnx_jit_T), reps=int(bc.nnx_jit_reps))
        ratios = compute_ratios(rows, bc)
        targets = evaluate_targets(ratios, bc)
        info["load_avg_1m_end"] = timing.load_average()

        print("\nmixer alone (fwd+bwd):\n" + format_table(rows, "mixer"))
        print("\nLM train step:\n" + format_table(rows, "lm"))
        print("\ntargets:\n" + format_summary(ratios, targets))

        title = (f"{exp_name}: {info.get('cpu_model', info['device_kind'])}, "
                 f"{info['cpu_count']} CPUs, "
                 f"JAX {info['jax_version']}, {bc.dtype}")
        fig = plot(rows, workdir / "scaling.png", title=title) if rows else None
        results = {
            "exp_name": exp_name,
            "machine": info,
            "matmul_peak": {"gflops_per_s": peak.flops_per_s / 1e9,
                            "median_gflops_per_s": peak.median_flops_per_s / 1e9,
                            "n": peak.n, "dtype": peak.dtype},
            "flops_source": "compiled.cost_analysis()['flops'] (XLA's count for one call)",
            "mfu_definition": ("flops_per_step / median_step_s / matmul_peak "
                               "(best of the timed matmuls)"),
            "rows": rows,
            "ratios": ratios,
            "targets": targets,
            "nnx_jit_comparison": nnx_cmp,
            "config": config.to_dict(),
            "wall_s": time.perf_counter() - start,
        }
        # W&B / metrics.jsonl: one log call per T (steps must increase), then table, figure,
        # summary.
        for T in sorted({r["T"] for r in rows}):
            logger.log({f"{r['series']}/{r['mixer']}/{k}": r[k] for r in rows if r["T"] == T
                        for k in ("step_ms", "tokens_per_s", "compile_s")
                        + (("mfu",) if r["mfu"] is not None else ())
                        }, step=T)
        columns = ["series", "mixer", "T", "batch", "tokens", "step_ms", "p25_ms", "p75_ms",
                   "min_ms", "max_ms", "tokens_per_s", "compile_s", "gflops_per_step", "mfu",
                   "peak_mem_mib"]
        last = max([r["T"] for r in rows], default=0)
        logger.log_table("scaling", columns, [[r[c] for c in columns] for r in rows], step=last)
        if fig is not None:
            logger.log_images({"scaling": fig}, step=last)
            import matplotlib.pyplot as plt

            plt.close(fig)
        summary = {"matmul_peak_gflops": peak.flops_per_s / 1e9}
        summary["grassmann_vs_reference_speedup"] = (
            ratios["grassmann_vs_reference_speedup"]["value"])
        for k, v in ratios.items():
            if k.startswith("lm_grassmann_over_attention"):
                summary[k] = v["value"]
        summary["grassmann_flatness"] = ratios["grassmann_flatness"]["value"]
        logger.set_summary({k: v for k, v in summary.items() if v is not None})
        results["wall_s"] = time.perf_counter() - start
        write_json(workdir / "results.json", results, indent=1)
        print(f"\nwrote {workdir / 'results.json'} and {workdir / 'scaling.png'} "
              f"in {results['wall_s']:.0f} s")
        return results
    finally:
        logger.finish()
