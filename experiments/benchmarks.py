"""Benchmark configs: attention vs Grassmann mixing, timed (grassjax.bench).

`benchmark_scaling[_gpu]`: step time vs sequence length, mixers alone and the LM train step;
`benchmark_vs_pytorch[_gpu]`: the same train step in JAX and PyTorch; `profile_train_step`: its
top XLA ops; `benchmark_generation`: streaming decode vs context. Every knob is under `bench`:
  python launch.py --exp=benchmark_scaling --config.bench.reps=3 --config.bench.lm_seq_lens=64,256
"""

import ml_collections

from experiments import shakespeare
from grassjax.bench.end_to_end import NANOGPT_CPU


def _bench(**changes) -> ml_collections.ConfigDict:
    bench = dict(
        # float32 | bfloat16 (mixer activations/weights and the LM compute dtype)
        dtype="float32",
        # timed calls per point (after warm-up); cut to min_reps for points slower than
        # point_budget_s
        reps=5,
        min_reps=3,
        warmup=1,  # untimed calls before timing (the first call also sizes reps)
        point_budget_s=6.0,  # time budget per point for the timed calls
        # points faster than this get an untimed call before each timed one (see scaling.py)
        settle_max_s=0.5,
        matmul_n=1024,  # the square matmul whose best rate is the MFU denominator
        matmul_reps=10,
        # --- mixer alone ---
        run_mixers=True,
        mixers=("attention", "attention_jax_nn", "attention_explicit", "grassmann_reference",
                "grassmann"),
        mixer_d=256,
        mixer_rank=32,
        mixer_heads=4,  # 4 heads of 64
        mixer_offsets=(1, 2, 4, 8, 12, 16),
        mixer_seq_lens=(64, 128, 256, 512, 1024, 2048, 4096),
        mixer_tokens_per_step=4096,
        # --- whole LM train step (model section below) ---
        run_lm=True,
        lm_mixers=("attention", "grassmann"),
        lm_seq_lens=(64, 128, 256, 512, 1024, 2048),
        lm_tokens_per_step=768,  # batch 12 x block 64, as the CPU Shakespeare runs
        vocab_size=65,  # tiny Shakespeare's characters
        # --- nnx split/merge in jax.jit vs nnx.jit + cached_partial, on the LM step ---
        compare_nnx_jit=False,  # opt-in one-off study: --config.bench.compare_nnx_jit=True
        nnx_jit_T=64,
        nnx_jit_reps=20,
        # --- where the ratios are read ---
        ratio_T=256,  # grassmann_mix vs reference
        lm_ratio_T=(256, 2048),  # Grassmann LM vs attention LM
        flat_T=(512, 4096),  # flatness of Grassmann step time at constant tokens/step
        targets=ml_collections.ConfigDict(dict(min_speedup_vs_reference=5.0,
                                               min_lm_speedup_long=2.0,
                                               max_flatness=1.3)),
    )
    bench.update(changes)
    return ml_collections.ConfigDict(bench)


def benchmark_scaling() -> ml_collections.ConfigDict:
    """CPU: the mixers alone at d=256, r=32 (the paper's width ratio), T = 64..4096 at 4096
    tokens per step, and the whole LM train step, T = 64..2048 at 768 tokens per step.

    The model/train sections are the CPU-budget Shakespeare ones (4 layers, d=128, r=16, AdamW).
    """
    # default_config() + the CPU model; mixer is set per arm
    cfg = shakespeare.grassmann_shakespeare_paper()
    cfg.bench = _bench()
    cfg.wandb.tags = ("benchmark",)
    return cfg


def benchmark_scaling_gpu() -> ml_collections.ConfigDict:
    """GPU: bfloat16, mixers at d=1024 (16 heads of 64, cuDNN's flash attention among them), the
    GPU Shakespeare LM (6 x 384, r=32), T up to 8192."""
    cfg = shakespeare.grassmann_shakespeare_gpu()
    # dropout changes nothing about the cost worth measuring; keeps runs comparable
    cfg.model.dropout = cfg.model.attn_dropout = 0.0
    cfg.bench = _bench(
        dtype="bfloat16",
        mixers=("attention", "attention_jax_nn", "attention_cudnn", "attention_explicit",
                "grassmann_reference", "grassmann"),
        reps=20,
        min_reps=5,
        warmup=3,
        point_budget_s=10.0,
        matmul_n=8192,
        matmul_reps=20,
        mixer_d=1024,
        mixer_heads=16,
        # Not 16384: XLA's attention (no flash kernel) needs more memory there than the GPU has
        # (docs/speed.md).
        mixer_seq_lens=(256, 512, 1024, 2048, 4096, 8192),
        mixer_tokens_per_step=32768,
        lm_seq_lens=(256, 512, 1024, 2048, 4096, 8192),
        lm_tokens_per_step=16384,  # batch 64 x block 256
        nnx_jit_T=256,
        ratio_T=1024,
        lm_ratio_T=(256, 8192),
        flat_T=(1024, 8192),
    )
    cfg.wandb.tags = ("benchmark", "gpu")
    return cfg


def benchmark_vs_pytorch() -> ml_collections.ConfigDict:
    """The CPU LMs' train step in JAX and in the PyTorch port, interleaved.

    nanoGPT's CPU recipe (block 64, batch 12) and block 256 at the same 768 tokens per step.
    Needs the torch extra.
    """
    # the CPU model and AdamW settings; the mixer is set per row
    cfg = shakespeare.grassmann_shakespeare_paper()
    cfg.bench = ml_collections.ConfigDict(dict(
        seq_lens=(64, 256),
        batch_sizes=(12, 3),
        mixers=("attention", "grassmann"),
        # torch_compile is skipped, with the reason, where it fails
        frameworks=("jax", "torch", "torch_compile"),
        reps=30,  # interleaved rounds: one step of each implementation per round
        warmup=3,
        loss_tolerance=1e-4,  # the first losses from the same weights must agree to this
        torch_threads=0,  # 0: one per core, as PyTorch's default
        vocab_size=65,
        dtype="float32",
        torch_device="cpu",  # cpu | cuda (JAX uses its default device: the GPU where jax sees one)
        matmul_precision="highest",  # highest | tensorfloat32, set alike on both sides for the run
    ))
    cfg.wandb.tags = ("benchmark", "pytorch")
    return cfg


def benchmark_vs_pytorch_gpu() -> ml_collections.ConfigDict:
    """benchmark_vs_pytorch on one NVIDIA GPU at nanoGPT's GPU model (6 x 384, r = 32, no dropout).

    Block 256 x batch 64 (its recipe) and block 1024 x 16, TF32 matmuls on both sides (so the
    first losses agree to 1e-2, not 1e-4).
    """
    cfg = benchmark_vs_pytorch()
    gpu = shakespeare.grassmann_shakespeare_gpu()
    cfg.model, cfg.train = gpu.model, gpu.train
    cfg.model.dropout = cfg.model.attn_dropout = 0.0
    cfg.bench.update(seq_lens=(256, 1024), batch_sizes=(64, 16), torch_device="cuda",
                     matmul_precision="tensorfloat32", loss_tolerance=1e-2, reps=50, warmup=5)
    cfg.wandb.tags = ("benchmark", "pytorch", "gpu")
    return cfg


def profile_train_step() -> ml_collections.ConfigDict:
    """A jax.profiler trace of the CPU LMs' train step, summed per XLA op.

    At nanoGPT's CPU recipe (block 64, batch 12): the top ops and their shares of the step
    (grassjax.bench.profile).
    """
    # the CPU model and AdamW settings; the mixer is set per row
    cfg = shakespeare.grassmann_shakespeare_paper()
    cfg.bench = ml_collections.ConfigDict(dict(
        mixers=("attention", "grassmann"),
        seq_len=64,
        batch_size=12,
        steps=20,  # traced steps, after warmup untraced ones
        warmup=3,
        top=15,  # ops listed per mixer in profile.md
        vocab_size=65,
        dtype="float32",
    ))
    cfg.wandb.tags = ("benchmark", "profile")
    return cfg


def benchmark_generation() -> ml_collections.ConfigDict:
    """Streaming decode speed and cache memory against context length (grassjax.bench.decoding).

    Random-init models at the CPU width (4 layers, d = 128, 4 heads, r = 16). Each model's
    block_size is max(contexts) + new_tokens, so that its learned position table reaches the
    longest context; the Grassmann mixer itself has no length limit.
    """
    # default_config() at the CPU-budget width; the bench sets the mixer
    cfg = shakespeare.grassmann_shakespeare_paper()
    cfg.bench = ml_collections.ConfigDict(dict(
        mixers=("attention", "grassmann"),
        contexts=(256, 1024, 2048, 4096, 8192),  # prompt lengths prefilled before decoding
        new_tokens=64,  # tokens decoded (timed) after each prefill
        # timed repeats of the decode loop (after one warm-up); the median is reported
        reps=5,
        batch=1,
        vocab_size=65,  # tiny Shakespeare's characters; no data is read
        temperature=1.0,
        seed=0,
    ))
    cfg.wandb.tags = ("benchmark", "generation")
    return cfg


def benchmark_end_to_end() -> ml_collections.ConfigDict:
    """The main command and transformer_shakespeare from start to exit, as subprocesses from a fresh
    HOME, an empty compile cache and a new workdir, split into phases; alternated with nanoGPT's own
    train.py (its README's CPU command) where --config.bench.nanogpt_dir names a checkout."""
    cfg = shakespeare.grassmann_shakespeare_paper()
    cfg.bench = ml_collections.ConfigDict(dict(
        commands=("grassmann_shakespeare", "transformer_shakespeare"),
        rounds=4,
        nanogpt_dir="",  # a clone of karpathy/nanoGPT; needs the torch extra
        nanogpt_args=NANOGPT_CPU,
        extra_flags=(),  # added to every grassjax command, e.g. --config.train.steps=100
        timeout_s=1800.0,
    ))
    cfg.wandb.tags = ("benchmark", "end_to_end")
    return cfg
