"""Batches of token windows: training batches reproducible from (seed, step), and fixed
evaluation batches."""

from __future__ import annotations

import numpy as np

from grassjax.data.files import DataError

# Evaluation windows come from their own random stream: a "step" no training run reaches.
EVAL_STREAM = 2**63


def _windows(tokens: np.ndarray, starts: np.ndarray,
             block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows tokens[s : s + block_size + 1] for every s in `starts` (any shape S) -> x, y int32
    (*S, T)."""
    # One fancy-indexing gather for the whole batch: (*S, 1) + (T + 1,) -> (*S, T + 1).
    windows = tokens[starts[..., None] + np.arange(block_size + 1)].astype(np.int32)
    return windows[..., :-1], windows[..., 1:]


def _check_tokens(tokens: np.ndarray, batch_size: int, block_size: int) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DataError(f"tokens must be one stream of shape (N,), got shape {tokens.shape}")
    if batch_size < 1 or block_size < 1:
        raise DataError(f"batch_size and block_size must be >= 1, got {batch_size} and "
                        f"{block_size}")
    if len(tokens) < block_size + 1:
        raise DataError(f"{len(tokens)} tokens cannot fill a window of block_size + 1 = "
                        f"{block_size + 1}; lower --config.data.block_size (or use a longer text / "
                        f"smaller val_fraction)")
    return tokens


def sample_batch(tokens: np.ndarray, *, batch_size: int, block_size: int, seed: int,
                 step: int) -> tuple[np.ndarray, np.ndarray]:
    """A random training batch: x, y int32 of shape (B, T), where y is x shifted one token left.

    The windows depend on (seed, step) alone, so a resumed run sees exactly the data it would
    have seen.
    """
    tokens = _check_tokens(tokens, batch_size, block_size)
    rng = np.random.default_rng([seed, step])
    # The last window ends at the last token.
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    return _windows(tokens, starts, block_size)


def eval_batches(tokens: np.ndarray, *, batch_size: int, block_size: int, num_batches: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed set of batches for estimating the loss: x, y int32 of shape (num_batches, B, T).

    The same every time for a seed, so successive evaluations are comparable, and drawn from a
    random stream that sample_batch never uses.
    """
    tokens = _check_tokens(tokens, batch_size, block_size)
    if num_batches < 1:
        raise DataError(f"--config.train.eval_batches must be >= 1, got {num_batches}")
    rng = np.random.default_rng([seed, EVAL_STREAM])
    starts = rng.integers(0, len(tokens) - block_size, size=(num_batches, batch_size))
    return _windows(tokens, starts, block_size)
