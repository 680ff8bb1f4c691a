"""Benchmark: streaming decode speed and cache memory vs context length, attention vs Grassmann.

Per context n and mixer: prefill n random tokens, then time a jitted scan decoding `new_tokens`
tokens (random-init models: decode cost depends on shapes, not weights). See docs/speed.md.
"""

from __future__ import annotations

import os
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from grassjax import generation
from grassjax.bench import timing
from grassjax.nn import ModelConfig, build_model, param_counts
from grassjax.runlog import RunLogger
from grassjax.runlog.records import write_json

MIB = 2**20


def _model_config(config: ml_collections.ConfigDict, mixer: str, block_size: int) -> ModelConfig:
    return ModelConfig.from_mapping({**config.model.to_dict(), "mixer": mixer, "kind": "lm",
                                     "vocab_size": config.bench.vocab_size,
                                     "block_size": block_size})


def measure(model, context: int, *, new_tokens: int, reps: int, batch: int, temperature: float,
            seed: int) -> dict:
    """Prefill `context` random tokens, then time decoding `new_tokens` positions.

    Returns one result row.
    """
    graphdef, state = nnx.split(model)
    max_len = context + new_tokens

    @jax.jit
    def prefill(state, prompt):
        return generation.prefill(nnx.merge(graphdef, state), prompt, max_len)

    @jax.jit
    def decode(state, logits, caches, key):
        # num_tokens = new_tokens + 1 draws run exactly new_tokens decode steps
        # (the first draw uses the prefill).
        tokens, _ = generation.sample_tokens(nnx.merge(graphdef, state), logits, caches, key,
                                           num_tokens=new_tokens + 1, temperature=temperature)
        return tokens

    prompt = jax.random.randint(jax.random.key(seed), (batch, context), 0, model.cfg.vocab_size,
                                jnp.int32)
    prefill_c = timing.compile_timed(prefill, state, prompt)
    start = time.perf_counter()
    # once: long prompts are slow
    logits, caches = jax.block_until_ready(prefill_c.executable(state, prompt))
    prefill_s = time.perf_counter() - start
    key = jax.random.key(seed + 1)
    decode_c = timing.compile_timed(decode, state, logits, caches, key)
    t = timing.time_compiled(decode_c.executable, state, logits, caches, key, reps=reps, warmup=1)
    peak_bytes, _ = timing.peak_memory_bytes(decode_c.executable)
    return {
        "mixer": model.cfg.mixer,
        "context": context,
        "decode_tokens_per_s": batch * new_tokens / t.median_s,
        "ms_per_token": 1e3 * t.median_s / new_tokens,
        "ms_per_token_p25": 1e3 * t.p25_s / new_tokens,
        "ms_per_token_p75": 1e3 * t.p75_s / new_tokens,
        # state holding `context` tokens
        "cache_bytes": generation.cache_bytes(model, batch, context),
        # room for the decoded tokens too
        "cache_bytes_allocated": generation.cache_bytes(model, batch, max_len),
        "decode_peak_bytes": peak_bytes,  # the decode call's buffers (params, caches, temporaries)
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": batch * context / prefill_s,
        "compile_s": (prefill_c.lower_s + prefill_c.compile_s + decode_c.lower_s
                      + decode_c.compile_s),
    }


def _plot(rows: list[dict], mixers, path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mixer in mixers:
        mine = sorted((r for r in rows if r["mixer"] == mixer), key=lambda r: r["context"])
        ctx = [r["context"] for r in mine]
        ax_speed.plot(ctx, [r["decode_tokens_per_s"] for r in mine], "o-", label=mixer)
        ax_mem.plot(ctx, [r["cache_bytes"] / MIB for r in mine], "o-", label=mixer)
    ax_speed.set(xscale="log", yscale="log", xlabel="context length (tokens)",
                 ylabel="decode tokens / s", title="decode throughput")
    ax_mem.set(xscale="log", yscale="log", xlabel="context length (tokens)",
               ylabel="cache / state (MiB)", title="generation state memory")
    contexts = sorted({r["context"] for r in rows})
    for ax in (ax_speed, ax_mem):
        ax.set_xticks(contexts, [str(c) for c in contexts])  # label the measured lengths only
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


def _close(fig):
    import matplotlib.pyplot as plt

    plt.close(fig)  # pyplot keeps every figure alive until closed


def _speedups(rows: list[dict]) -> dict[str, float]:
    """Grassmann decode tokens/s over attention's, per context (when both mixers ran)."""
    by = {(r["mixer"], r["context"]): r["decode_tokens_per_s"] for r in rows}
    return {f"grassmann_over_attention_tok_s@{c}": by["grassmann", c] / by["attention", c]
            for m, c in by if m == "attention" and ("grassmann", c) in by}


def _table(rows: list[dict]) -> str:
    header = (f"{'mixer':<10} {'context':>7} {'tok/s':>9} {'ms/tok':>8} {'cache MiB':>10} "
              f"{'prefill s':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['mixer']:<10} {r['context']:>7} {r['decode_tokens_per_s']:>9.1f} "
                     f"{r['ms_per_token']:>8.3f} "
                     f"{r['cache_bytes'] / MIB:>10.4f} {r['prefill_s']:>9.3f}")
    return "\n".join(lines)


def run_generation_benchmark(config: ml_collections.ConfigDict, *, workdir, exp_name: str,
                             data_dir=None, wandb_mode: str | None = None) -> dict:
    """Run the benchmark described by config.bench.

    Returns the results dict also written to results.json. data_dir is accepted for launch.py's
    common runner signature and unused: prompts are random tokens.
    """
    del data_dir
    bench = config.bench
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    contexts = sorted(int(c) for c in bench.contexts)
    mixers = tuple(bench.mixers)
    block_size = max(contexts) + int(bench.new_tokens)
    models = {m: build_model(_model_config(config, m, block_size), seed=int(bench.seed))
              for m in mixers}
    load_before = os.getloadavg()
    logger = RunLogger(workdir=workdir, project=config.wandb.project,
                       name=config.wandb.name or exp_name, group=config.wandb.group or None,
                       tags=list(config.wandb.tags), config=config.to_dict(), mode=wandb_mode,
                       job_type="benchmark", print_fn=print)
    sizes = ", ".join(f"{m} {param_counts(models[m])['total']:,} params" for m in mixers)
    print(f"{exp_name}: decode {bench.new_tokens} tokens after prefilling {contexts} tokens, "
          f"batch {bench.batch}, "
          f"median of {bench.reps}; {sizes}; "
          f"load average {load_before[0]:.2f} on {os.cpu_count()} cores")
    rows = []
    start = time.perf_counter()
    try:
        for context in contexts:  # outer loop over context: W&B steps must increase
            step_rows = [measure(models[m], context, new_tokens=int(bench.new_tokens),
                                 reps=int(bench.reps), batch=int(bench.batch),
                                 temperature=float(bench.temperature), seed=int(bench.seed))
                         for m in mixers]
            for r in step_rows:
                print(f"  {r['mixer']:<10} context {context:>6}: "
                      f"{r['decode_tokens_per_s']:8.1f} tok/s, "
                      f"{r['ms_per_token']:.3f} ms/token, cache {r['cache_bytes'] / MIB:.4f} MiB")
            rows.extend(step_rows)
            logger.log({f"{key}/{r['mixer']}": r[key] for r in step_rows
                        for key in ("decode_tokens_per_s", "ms_per_token", "cache_bytes",
                                    "prefill_s")},
                       step=context)
        table = _table(rows)
        print(table)
        fig = _plot(rows, mixers, workdir / "generation.png")
        columns = list(rows[0].keys())
        logger.log_table("generation", columns, [[r[c] for c in columns] for r in rows],
                         step=max(contexts))
        logger.log_images({"generation": fig}, step=max(contexts))
        _close(fig)
        summary = {f"{r['mixer']}/{key}@{r['context']}": r[key] for r in rows
                   for key in ("decode_tokens_per_s", "ms_per_token", "cache_bytes")}
        speedups = _speedups(rows)
        summary.update(speedups)
        for key, value in speedups.items():
            print(f"{key}: {value:.2f}x")
        logger.set_summary(summary)
    finally:
        logger.finish()
    results = {
        "experiment": exp_name,
        "config": config.to_dict(),
        "block_size": block_size,
        "params": {m: param_counts(models[m]) for m in mixers},
        "environment": {**timing.machine_info(), "load_average_before": load_before,
                        "load_average_after": os.getloadavg()},
        "wall_s": time.perf_counter() - start,
        "results": rows,
        "summary": summary,
        "table": table,
    }
    write_json(workdir / "results.json", results, indent=2)
    print(f"wrote {workdir / 'results.json'} and {workdir / 'generation.png'} "
          f"in {results['wall_s']:.0f} s")
    return results

