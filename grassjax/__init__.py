"""grassjax: the Causal Grassmann LM and a causal Transformer, side by side, in JAX.

The layers of the package and what each may import are drawn in the README's "Layout" section:
functional -> nn -> (data, generation) -> train, bench, baselines -> experiments -> launch.py.
"""

__version__ = "0.1.0"


def load_run(workdir):
    """(model, vocab, config) of a training run's workdir, from its newest good checkpoint; see grassjax.trained."""
    from grassjax.trained import load_run as _load_run

    return _load_run(workdir)
