"""The registry of named experiments that `launch.py --exp=NAME` runs, and `run`, which runs one.

Each experiment is a config (an ml_collections ConfigDict built by a plain
function) plus the name of the runner that consumes it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable

import ml_collections

from experiments import benchmarks, shakespeare, wikitext


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    get_config: Callable[[], ml_collections.ConfigDict]
    runner: str = "train"  # which runner (see `run`) consumes the config

    @property
    def measures_compilation(self) -> bool:
        """Its results include compile times, so a compilation cache would falsify them."""
        return self.runner in TIMING_RUNNERS


# Runners whose results time compilation (see `run` for every runner).
TIMING_RUNNERS = frozenset({"benchmark_scaling", "benchmark_generation", "benchmark_vs_pytorch",
                            "benchmark_end_to_end", "profile"})


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in [
    Experiment("grassmann_shakespeare", "Causal Grassmann LM (order-keeping, tuned) on tiny "
               "Shakespeare, CPU budget (~minutes)",
               shakespeare.grassmann_shakespeare),
    Experiment("grassmann_shakespeare_paper", "the paper's Grassmann layer (offsets averaged) at "
               "nanoGPT's learning rate, CPU budget", shakespeare.grassmann_shakespeare_paper),
    Experiment("transformer_shakespeare", "causal Transformer matched to grassmann_shakespeare in "
               "size and budget",
               shakespeare.transformer_shakespeare),
    Experiment("bigram_shakespeare", "bigram baseline on tiny Shakespeare",
               shakespeare.bigram_shakespeare),
    Experiment("grassmann_shakespeare_gpu",
               "Grassmann LM at nanoGPT's GPU recipe (6x384, block 256)",
               shakespeare.grassmann_shakespeare_gpu),
    Experiment("transformer_shakespeare_gpu",
               "Transformer at nanoGPT's GPU recipe (6x384, block 256)",
               shakespeare.transformer_shakespeare_gpu),
    Experiment("ngram_shakespeare", "Kneser-Ney character n-grams, 0..5 characters of context "
               "(seconds, NumPy)",
               shakespeare.ngram_shakespeare, runner="ngram"),
    Experiment("compare_shakespeare", "Grassmann vs matched Transformer, 3 seeds each, with "
               "report.md and plots",
               shakespeare.compare_shakespeare, runner="compare"),
    Experiment("ablate_shakespeare", "ablation: offset sets, per-layer offsets, order-keeping "
               "variant, local controls vs Transformer, with gaps, waterfall and n-gram lines",
               shakespeare.ablate_shakespeare, runner="compare"),
    Experiment("tune_shakespeare", "Optuna learning-rate search, persistent SQLite study with "
               "pruning (pip install -e .[tune])", shakespeare.tune_shakespeare, runner="tune"),
    Experiment("compare_shakespeare_gpu", "compare_shakespeare at the GPU recipe",
               shakespeare.compare_shakespeare_gpu, runner="compare"),
    Experiment("longctx_shakespeare", "Transformer vs the best Grassmann arm at blocks "
               "256/512/1024, matched by training time, 3 seeds (~1 h on 2 cores): who is ahead "
               "from which context length",
               shakespeare.longctx_shakespeare, runner="compare"),
    Experiment("longctx_shakespeare_gpu", "longctx_shakespeare at the GPU model, blocks 256-2048, "
               "300 s per run",
               shakespeare.longctx_shakespeare_gpu, runner="compare"),
    Experiment("benchmark_scaling",
               "step time, tokens/s, memory of each mixer and LM vs sequence length",
               benchmarks.benchmark_scaling, runner="benchmark_scaling"),
    Experiment("benchmark_scaling_gpu", "benchmark_scaling in bfloat16 at GPU sizes",
               benchmarks.benchmark_scaling_gpu, runner="benchmark_scaling"),
    Experiment("benchmark_vs_pytorch", "JAX vs PyTorch (eager, torch.compile) train steps of the "
               "same LMs, interleaved; needs pip install -e .[torch]",
               benchmarks.benchmark_vs_pytorch, runner="benchmark_vs_pytorch"),
    Experiment("benchmark_vs_pytorch_gpu", "benchmark_vs_pytorch on one NVIDIA GPU, nanoGPT's GPU "
               "model, TF32 on both sides", benchmarks.benchmark_vs_pytorch_gpu,
               runner="benchmark_vs_pytorch"),
    Experiment("profile_train_step", "jax.profiler trace of the CPU LMs' train step: the top XLA "
               "ops and their shares", benchmarks.profile_train_step, runner="profile"),
    Experiment("benchmark_generation", "streaming decode tokens/s and cache memory vs context, up "
               "to 8k",
               benchmarks.benchmark_generation, runner="benchmark_generation"),
    Experiment("benchmark_end_to_end", "the main command and transformer_shakespeare from start to "
               "exit, split into phases, alternated with nanoGPT's train.py "
               "(--config.bench.nanogpt_dir=PATH)", benchmarks.benchmark_end_to_end,
               runner="benchmark_end_to_end"),
    Experiment("paper_wikitext2_transformer_6l", "paper setting: Transformer, 6 layers, block 128, "
               "WikiText-2",
               wikitext.paper_wikitext2_transformer_6l),
    Experiment("paper_wikitext2_grassmann_6l", "paper setting: Grassmann, 6 layers, block 128, "
               "WikiText-2",
               wikitext.paper_wikitext2_grassmann_6l),
    Experiment("paper_wikitext2_transformer_12l", "paper setting: Transformer, 12 layers, "
               "block 256, WikiText-2",
               wikitext.paper_wikitext2_transformer_12l),
    Experiment("paper_wikitext2_grassmann_12l", "paper setting: Grassmann, 12 layers, block 256, "
               "per-layer offsets",
               wikitext.paper_wikitext2_grassmann_12l),
    Experiment("compare_wikitext2", "paper 6-layer Grassmann vs Transformer on WikiText-2, with "
               "report",
               wikitext.compare_wikitext2, runner="compare"),
]}


class UnknownExperimentError(KeyError):
    def __str__(self):
        return self.args[0]


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise UnknownExperimentError(f"unknown experiment {name!r}; "
                                     f"valid: {', '.join(sorted(EXPERIMENTS))} "
                                     f"(python launch.py --list describes them)")
    return EXPERIMENTS[name]


def resolve_config(name: str,
                   overrides: dict[str, str]) -> tuple[Experiment, ml_collections.ConfigDict]:
    """The experiment and its config with the --config.* overrides applied.

    Type-checked and validated.
    """
    from grassjax.studies.arms import validate_comparison
    from grassjax.train.config import apply_overrides

    experiment = get_experiment(name)
    config = apply_overrides(experiment.get_config(), overrides)
    validate_comparison(config)  # a single run's checks, and a comparison's own
    return experiment, config


def run(name: str, overrides: dict[str, str] | None = None, *, workdir: str | None = None,
        data_dir: str | None = None, wandb_mode: str | None = None, restart: bool = False):
    """Resolve and run one experiment in `workdir` (default runs/<name>).

    Returns whatever its runner returns. restart moves an existing workdir aside first instead of
    resuming it.
    """
    # Imported here: `launch.py --list` and config errors stay fast, and optional extras load
    # only when used.
    from grassjax.baselines.runner import run_ngram_baselines
    from grassjax.bench.decoding import run_generation_benchmark
    from grassjax.bench.end_to_end import run_end_to_end_benchmark
    from grassjax.bench.profile import run_profile
    from grassjax.bench.scaling import run_scaling_benchmark
    from grassjax.bench.vs_pytorch import run_vs_pytorch_benchmark
    from grassjax.studies.compare import run_comparison
    from grassjax.train.loop import train
    from grassjax.studies.tune import run_tuning

    experiment, config = resolve_config(name, overrides or {})
    workdir = workdir or os.path.join("runs", name)
    if restart:
        from grassjax.train.workdir import move_aside

        move_aside(pathlib.Path(workdir))
    runners = {"train": train, "compare": run_comparison,
               "benchmark_scaling": run_scaling_benchmark,
               "benchmark_generation": run_generation_benchmark,
               "benchmark_vs_pytorch": run_vs_pytorch_benchmark,
               "benchmark_end_to_end": run_end_to_end_benchmark,
               "ngram": run_ngram_baselines, "tune": run_tuning, "profile": run_profile}
    return runners[experiment.runner](config, workdir=workdir, exp_name=name, data_dir=data_dir,
                                      wandb_mode=wandb_mode)
