"""Timing helpers for the benchmarks: wall-clock statistics, compile time, peak memory, matmul peak.

Everything here times *compiled* executables (``jax.jit(f).lower(...).compile()``)
so that tracing and compilation never leak into a step time, and blocks on
the result of every call, so asynchronous dispatch does not hide work.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from grassjax import host
from grassjax.compiled import compiled_memory_bytes


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of `reps` timed calls (after warm-up)."""

    median_s: float
    p25_s: float
    p75_s: float
    min_s: float
    max_s: float
    reps: int

    @classmethod
    def from_samples(cls, samples) -> "Timing":
        s = np.asarray(samples, dtype=np.float64)
        if s.size == 0:
            raise ValueError("no timing samples")
        p25, med, p75 = np.percentile(s, [25, 50, 75])
        return cls(float(med), float(p25), float(p75), float(s.min()), float(s.max()),
                   int(s.size))

    def as_dict(self, prefix: str = "", unit: str = "ms") -> dict[str, float]:
        scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
        return {f"{prefix}{k}_{unit}": scale * getattr(self, f"{k}_s")
                for k in ("median", "p25", "p75", "min", "max")}

    def __str__(self):
        return (f"{1e3 * self.median_s:.2f} ms "
                f"(IQR {1e3 * self.p25_s:.2f}-{1e3 * self.p75_s:.2f}, n={self.reps})")


def time_fn(call: Callable[[], Any], *, reps: int, warmup: int = 1,
            min_time_s: float = 0.0) -> Timing:
    """Time `call()` (blocking on its result) `reps` times after `warmup` untimed calls.

    With min_time_s > 0, keeps timing past `reps` until that much time was
    spent in timed calls (useful for micro-second kernels). At least one rep.
    """
    for _ in range(max(0, warmup)):
        jax.block_until_ready(call())
    samples: list[float] = []
    spent = 0.0
    while len(samples) < max(1, reps) or spent < min_time_s:
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        dt = time.perf_counter() - t0
        samples.append(dt)
        spent += dt
        if len(samples) >= 10_000:
            break
    return Timing.from_samples(samples)


def time_compiled(fn: Callable, *args, reps: int, warmup: int = 1,
                  min_time_s: float = 0.0) -> Timing:
    """Time a compiled (or jitted) function on fixed arguments.

    Do not use with donated arguments.
    """
    return time_fn(lambda: fn(*args), reps=reps, warmup=warmup, min_time_s=min_time_s)


def time_stateful(step: Callable, state, *args, reps: int, warmup: int = 1) -> tuple[Timing, Any]:
    """Time `state, aux = step(state, *args)` repeatedly, threading the state (donation-safe).

    Returns the timing and the final state.
    """
    box = [state]

    def call():
        box[0], aux = step(box[0], *args)
        return aux, box[0]

    timing = time_fn(call, reps=reps, warmup=warmup)
    return timing, box[0]


@dataclasses.dataclass(frozen=True)
class Compiled:
    executable: Any  # jax.stages.Compiled
    lower_s: float
    compile_s: float


def compile_timed(jitted, *args, compiler_options: dict | None = None, **kwargs) -> Compiled:
    """`jitted.lower(*args).compile()`, timing the two stages separately."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    t1 = time.perf_counter()
    executable = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    t2 = time.perf_counter()
    return Compiled(executable, t1 - t0, t2 - t1)


def device_peak_memory_bytes(device=None) -> int | None:
    """The device allocator's peak (memory_stats()['peak_bytes_in_use']).

    None where unsupported (CPU).
    """
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without stats raise or return None
        return None
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def peak_memory_bytes(compiled, device=None) -> tuple[int | None, str]:
    """Peak memory of one call of `compiled`: (bytes, source).

    XLA's static buffer assignment, `memory_analysis()`, where the backend gives it:
    argument + output + temp bytes, minus aliased (donated) bytes, which are counted in both
    arguments and outputs. It is per executable, so points of one benchmark can be compared.
    Else the device allocator's peak (GPU/TPU), which is the process-wide high-water mark so
    far: read right after running `compiled`, and only an upper bound once a bigger
    executable has run in the process.
    """
    total = compiled_memory_bytes(compiled)
    if total is not None:
        return total, "compiled.memory_analysis (argument + output + temp - alias)"
    peak = device_peak_memory_bytes(device)
    if peak is not None:
        return int(peak), "device.memory_stats peak_bytes_in_use (process-wide high-water mark)"
    return None, "unavailable"


@dataclasses.dataclass(frozen=True)
class MatmulPeak:
    flops_per_s: float  # best (min-time) rate: the peak
    median_flops_per_s: float
    n: int
    dtype: str
    timing: Timing


def measure_matmul_peak(n: int = 1024, dtype=jnp.float32, reps: int = 10, *, batch: int = 1,
                        min_time_s: float = 0.0) -> MatmulPeak:
    """Achievable matmul rate on the default device.

    Times `batch` chained (n x n) @ (n x n) products.

    The peak is 2 n^3 batch / min time. Take n=1024 on a small CPU, 4096+
    (bfloat16) on an accelerator.
    """
    rng = np.random.default_rng(0)  # NumPy: no extra compilation for the inputs
    a = jnp.asarray(rng.standard_normal((batch, n, n), np.float32), dtype)
    b = jnp.asarray(rng.standard_normal((n, n), np.float32) / np.sqrt(n), dtype)
    f = jax.jit(lambda a, b: jnp.einsum("bij,jk->bik", a, b, preferred_element_type=dtype))
    exe = f.lower(a, b).compile()
    timing = time_compiled(exe, a, b, reps=reps, warmup=2, min_time_s=min_time_s)
    flops = 2.0 * n ** 3 * batch
    return MatmulPeak(flops / timing.min_s, flops / timing.median_s, n, jnp.dtype(dtype).name,
                      timing)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    dev = jax.devices()[0]
    info = {
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # glibc keeps freed blocks below this many bytes for reuse
        # (launch.py's default; 0: glibc's own behaviour)
        "malloc_keeps_freed_below_bytes": host.kept_below_bytes,
    }
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    return info


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
