"""The scaling benchmark end to end on tiny sizes (no timing assertions), and its timing helpers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks import benchmark_scaling, benchmark_scaling_gpu
from grassjax.bench import scaling, timing
from grassjax.compiled import compiled_flops


def _tiny_config():
    cfg = benchmark_scaling()
    cfg.model.update(num_layers=1, d_model=16, num_heads=2, d_ff=32, rank=4, offsets=(1, 2))
    cfg.bench.update(
        reps=2, min_reps=1, warmup=1, matmul_n=64, matmul_reps=2,
        mixers=("attention", "grassmann_reference", "grassmann"),  # all of MIXERS: test_mixers_agree_with_each_other
        mixer_d=16, mixer_rank=4, mixer_heads=2, mixer_offsets=(1, 2), mixer_seq_lens=(16, 32),
        mixer_tokens_per_step=32,
        # One LM length keeps the test fast (each LM step takes seconds to compile); 16 tokens per step at
        # T=32 exercises the batch floor: batch 1, tokens per step not constant.
        lm_seq_lens=(32,), lm_tokens_per_step=16,
        ratio_T=16, lm_ratio_T=(32, 32), flat_T=(16, 32), compare_nnx_jit=False, nnx_jit_T=16, nnx_jit_reps=2,
    )
    return cfg


def test_scaling_benchmark_writes_results_ratios_and_plot(tmp_path):
    results = scaling.run_scaling_benchmark(_tiny_config(), workdir=tmp_path, exp_name="bench_test",
                                            wandb_mode="disabled")
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "scaling.png").stat().st_size > 0
    for res in (results, on_disk):
        assert {"machine", "matmul_peak", "rows", "ratios", "targets", "nnx_jit_comparison", "config"} <= set(res)
        rows = res["rows"]
        assert {(r["series"], r["mixer"], r["T"]) for r in rows} == (
            {("mixer", m, T) for m in ("attention", "grassmann_reference", "grassmann") for T in (16, 32)}
            | {("lm", m, 32) for m in scaling.LM_MIXERS})
        for r in rows:
            assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["reps"] >= 1 and r["compile_s"] >= 0
            assert r["p25_ms"] <= r["step_ms"] <= r["p75_ms"] and r["min_ms"] <= r["max_ms"]
            assert r["tokens"] == r["batch"] * r["T"]
            assert r["peak_mem_mib"] is None or r["peak_mem_mib"] > 0
        lm = {(r["mixer"], r["T"]): r for r in rows if r["series"] == "lm"}
        assert lm[("grassmann", 32)]["batch"] == 1 and not lm[("grassmann", 32)]["tokens_constant"]
        mixer = {(r["mixer"], r["T"]): r for r in rows if r["series"] == "mixer"}
        assert mixer[("grassmann", 16)]["batch"] == 2 and mixer[("grassmann", 32)]["tokens_constant"]
        ratios = res["ratios"]
        assert ratios["grassmann_vs_reference_speedup"]["value"] > 0
        assert ratios["lm_grassmann_over_attention_T32"]["value"] > 0
        assert ratios["grassmann_flatness"]["value"] >= 1.0 and ratios["grassmann_flatness"]["source"] == "mixer"
        assert len(res["targets"]) == 4 and all(t["measured"] is not None for t in res["targets"])
    assert (tmp_path / "metrics.jsonl").exists()


def test_nnx_jit_comparison_runs():
    cfg = _tiny_config()
    cfg.bench.lm_mixers = ("grassmann",)
    out = scaling.compare_nnx_jit(cfg, T=16, reps=2)
    assert out["batch"] == 1 and out["grassmann"]["nnx_over_functional"] > 0


def test_mixers_agree_with_each_other():
    """The benchmarked callables compute what they claim: two attentions equal, two Grassmanns equal."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 24, 16)), jnp.float32)
    outs = {}
    for kind in scaling.MIXERS:
        if kind == "attention_cudnn":  # an NVIDIA GPU in bfloat16 only; this checks float32 on any backend
            continue
        p = scaling.mixer_params(kind, 16, 4, seed=1)
        outs[kind] = scaling.mixer_fn(kind, num_heads=2, offsets=(1, 2, 4))(x, p)
    np.testing.assert_allclose(outs["attention"], outs["attention_explicit"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outs["attention_jax_nn"], outs["attention_explicit"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outs["grassmann"], outs["grassmann_reference"], rtol=1e-4, atol=1e-5)


def test_timing_helpers():
    f = jax.jit(lambda a: (a @ a).sum())
    a = jnp.ones((32, 32))
    comp = timing.compile_timed(f, a)
    assert comp.lower_s >= 0 and comp.compile_s >= 0
    t = timing.time_compiled(comp.executable, a, reps=3)
    assert t.reps == 3 and t.min_s <= t.median_s <= t.max_s
    assert compiled_flops(comp.executable) == pytest.approx(2 * 32**3 + 32 * 32, rel=0.5)
    mem, source = timing.peak_memory_bytes(comp.executable)
    assert mem is None or mem > 0
    assert source
    peak = timing.measure_matmul_peak(64, reps=2)
    assert peak.flops_per_s >= peak.median_flops_per_s > 0


def test_gpu_config_is_consistent():
    cfg = benchmark_scaling_gpu()
    assert cfg.bench.dtype == "bfloat16" and cfg.bench.mixer_d % cfg.bench.mixer_heads == 0
    assert cfg.bench.ratio_T in cfg.bench.mixer_seq_lens
    assert all(t in cfg.bench.lm_seq_lens for t in cfg.bench.lm_ratio_T)


def test_crossover_is_the_first_T_from_which_grassmann_stays_faster():
    def row(mixer, T, ms):
        return dict(series="mixer", mixer=mixer, T=T, step_ms=ms, gflops_per_step=1.0, tokens_constant=True)

    rows = [row("grassmann", 256, 2.0), row("grassmann", 512, 2.0), row("grassmann", 1024, 2.0),
            row("attention_cudnn", 256, 2.5), row("attention_cudnn", 512, 1.5), row("attention_cudnn", 1024, 3.0),
            row("attention", 256, 1.0), row("attention", 512, 1.0), row("attention", 1024, 1.0)]
    cfg = _tiny_config()
    cfg.bench.update(ratio_T=256, lm_ratio_T=(256, 1024), flat_T=(256, 1024))
    crossover = scaling.compute_ratios(rows, cfg.bench)["grassmann_mixer_crossover"]
    # Faster at 256, slower at 512, faster again at 1024: it stays faster only from 1024 on.
    assert crossover["attention_cudnn"]["from_T"] == 1024
    assert crossover["attention_cudnn"]["grassmann_over_attention"][256] == pytest.approx(0.8)
    assert crossover["attention"]["from_T"] is None
    summary = scaling.format_summary(scaling.compute_ratios(rows, cfg.bench), [])
    assert "faster than attention_cudnn (mixer alone) from T=1024 on" in summary
    assert "faster than attention (mixer alone) at no T up to 1024" in summary


def test_end_to_end_benchmark_splits_a_command_into_phases_that_add_up(tmp_path, text_data_dir):
    """The phases come from the run's own timestamps and timers; only the interpreter's start-up is
    the parent's, so what they leave out of the wall time is real overhead, and it must be small."""
    import json

    from experiments.benchmarks import benchmark_end_to_end
    from grassjax.bench.end_to_end import run_end_to_end_benchmark
    from grassjax.runlog import offline
    from tests.conftest import TINY_OVERRIDES

    cfg = benchmark_end_to_end()
    cfg.bench.update(commands=("grassmann_shakespeare", "bigram_shakespeare"), rounds=2,
                     extra_flags=tuple(f"--config.{k}={v}" for k, v in
                                       {**TINY_OVERRIDES, "train.steps": "40"}.items()))
    results = run_end_to_end_benchmark(cfg, workdir=tmp_path / "e2e", exp_name="benchmark_end_to_end",
                                       data_dir=str(text_data_dir), wandb_mode="offline")
    saved = json.loads((tmp_path / "e2e" / "results.json").read_text())
    assert [[r["command"] for r in rnd] for rnd in saved["rounds"]] == [
        ["grassmann_shakespeare", "bigram_shakespeare"], ["bigram_shakespeare", "grassmann_shakespeare"]]
    for run in (r for rnd in results["rounds"] for r in rnd):
        phases = run["phases"]
        assert all(v >= 0 for v in phases.values()) and phases["steps"] > 0 and phases["compilation"] > 0
        assert abs(run["accounted_s"] - run["wall_s"]) < 0.05 * run["wall_s"], (run["accounted_s"], run["wall_s"])
        assert run["steps"] == 40 and run["load_avg_1m"] >= 0
    assert set(results["summary"]) == {"grassmann_shakespeare", "bigram_shakespeare"}
    assert (tmp_path / "e2e" / "end_to_end.png").stat().st_size > 5000
    history = set().union(*offline.read_history(tmp_path / "e2e"))
    assert {"wall_s/grassmann_shakespeare", "wall_s/bigram_shakespeare"} <= history


def test_end_to_end_benchmark_names_a_wrong_nanogpt_dir_in_one_line(tmp_path):
    from tests.test_train import cli

    proc = cli("--exp=benchmark_end_to_end", f"--workdir={tmp_path / 'e2e'}",
               f"--config.bench.nanogpt_dir={tmp_path}", "--wandb_mode=disabled")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "is not a nanoGPT checkout (no train.py" in lines[0] and "karpathy/nanoGPT" in lines[0]
    assert not (tmp_path / "e2e").exists()  # refused before anything was written or run
