"""Streaming generation benchmark: decode speed and cache memory vs context length.

Random-init models at the CPU-budget width of experiments/shakespeare.py
(4 layers, d = 128, 4 heads, r = 16). Each model is built with block_size =
max(contexts) + new_tokens so its learned position table reaches the longest
context; the Grassmann mixer itself has no length limit.
"""

import ml_collections

from experiments.shakespeare import grassmann_shakespeare_paper


def benchmark_generation() -> ml_collections.ConfigDict:
    cfg = grassmann_shakespeare_paper()  # default_config() at the CPU-budget width; the bench sets the mixer
    cfg.bench = ml_collections.ConfigDict(dict(
        mixers=("attention", "grassmann"),
        contexts=(256, 1024, 2048, 4096, 8192),  # prompt lengths prefilled before decoding
        new_tokens=64,  # tokens decoded (timed) after each prefill
        reps=5,  # timed repeats of the decode loop (after one warm-up); the median is reported
        batch=1,
        vocab_size=65,  # tiny Shakespeare's characters; no data is read
        temperature=1.0,
        seed=0,
    ))
    cfg.wandb.tags = ("benchmark", "generation")
    return cfg
