"""grassjax: the Causal Grassmann LM and a causal Transformer, side by side, in JAX.

Layers of the package, each depending only on the ones above it:
  grassjax.functional  pure JAX functions (attention, Grassmann mixing, statistics)
  grassjax.nn          Flax NNX modules wrapping them, and the language models
  grassjax.data        character-level data (NumPy only)
  grassjax.train       optimizer, jitted steps, the one training loop, logging
"""

__version__ = "0.1.0"


def load_run(workdir):
    """(model, vocab, config) of a training run's workdir, from its newest good checkpoint; see grassjax.trained."""
    from grassjax.trained import load_run as _load_run

    return _load_run(workdir)
