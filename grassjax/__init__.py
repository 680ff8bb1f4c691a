"""grassjax: the Causal Grassmann LM and a causal Transformer, side by side, in JAX.

Layers, each importing only those before it (README, "Layout"):
functional -> nn -> data, generation, runlog -> train -> inference, bench, baselines -> studies.
"""

__version__ = "0.1.0"


def load_run(workdir, checkpoint=None):
    """(model, vocab, config) of a training run's workdir: its best checkpoint where it kept one
    ("best"), else the newest good one ("latest"), or a step; see grassjax.inference.load_run."""
    from grassjax.inference import load_run as _load_run

    return _load_run(workdir, checkpoint=checkpoint)
