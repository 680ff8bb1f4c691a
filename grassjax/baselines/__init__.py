"""Count-based baselines (NumPy only): what a model with no learned parameters reaches on the same
split."""

from grassjax.baselines.ngram import (
    KneserNeyModel,
    evaluate,
    fit_kneser_ney,
    log_probs,
    ngram_reference_rows,
)

__all__ = ["KneserNeyModel", "evaluate", "fit_kneser_ney", "log_probs", "ngram_reference_rows"]
