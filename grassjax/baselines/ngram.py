"""Interpolated Kneser–Ney n-gram models over token ids, vectorised in NumPy.

`fit_kneser_ney` fits modified (or classic, fixed-discount) interpolated Kneser–Ney on a token
stream, `log_probs` / `evaluate` score another stream the way a causal LM scores a window, and
`ngram_reference_rows` sweeps context lengths. No Python loop runs over tokens: every n-gram of
one order is counted at once with np.unique (see `_ngram_ids`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import numpy as np


def _ngram_ids(tokens: np.ndarray, vocab_size: int, k: int) -> np.ndarray:
    """Ids of the k-grams ending at positions k-1 .. T-1: (T - k + 1,) int64 (empty if T < k).

    An n-gram is encoded as one int64, base V with the oldest token in the highest digit, so
    np.unique on an (N_tokens,) array counts every n-gram of one order at once, `id // V` is its
    context and `id % V**(k-1)` drops its oldest token. V**N must fit in int64 (N <= 6 for 65
    characters, N <= 4 for a 30,522-token vocabulary).
    """
    t = np.asarray(tokens, np.int64)
    n = len(t) - k + 1
    if n <= 0:
        return np.zeros(0, np.int64)
    ids = np.zeros(n, np.int64)
    for j in range(k):  # oldest token first: it ends in the highest digit
        ids = ids * vocab_size + t[j : j + n]
    return ids


def _check_fits(vocab_size: int, order: int) -> None:
    if vocab_size ** order >= 2**63:
        raise ValueError(f"{order}-grams over a vocabulary of {vocab_size} do not fit an int64 id; "
                         f"use a context of at most "
                         f"{int(63 * math.log(2) / math.log(vocab_size)) - 1}")


@dataclasses.dataclass(frozen=True)
class _Level:
    """One order k: its k-gram counts and, per (k-1)-token context, the interpolation terms."""

    ngram_ids: np.ndarray  # (G,) sorted unique k-gram ids
    # (G,) their counts (raw at the top order, continuation below), float64
    counts: np.ndarray
    context_ids: np.ndarray  # (C,) sorted unique contexts, = ngram_ids // V
    context_totals: np.ndarray  # (C,) n(c •)
    context_gamma: np.ndarray  # (C,) γ(c) = D1 N1(c •) + D2 N2(c •) + D3 N3+(c •)
    discounts: tuple[float, float, float]  # D1, D2, D3+


def _estimate_discounts(counts: np.ndarray) -> tuple[float, float, float]:
    """Chen & Goodman's D1, D2, D3+ from the count-of-counts.

    A single Y where the data are too thin.
    """
    n = [int(np.sum(counts == i)) for i in (1, 2, 3, 4)]
    y = n[0] / (n[0] + 2 * n[1]) if n[0] + 2 * n[1] > 0 else 0.5
    if min(n) == 0:  # tiny data: fall back to classic KN with D = Y
        return (y, y, y)
    d = (1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2])
    if not all(0 < di < i + 1 for i, di in enumerate(d)):
        return (y, y, y)
    return d


def _level(ngram_ids: np.ndarray, counts: np.ndarray, vocab_size: int,
           discount: float | None) -> _Level:
    counts = counts.astype(np.float64)
    d = _estimate_discounts(counts) if discount is None else (float(discount),) * 3
    per_ngram_discount = np.where(counts == 1, d[0], np.where(counts == 2, d[1], d[2]))
    contexts = ngram_ids // vocab_size  # sorted, because the ids are
    context_ids, start = np.unique(contexts, return_index=True)
    return _Level(ngram_ids=ngram_ids, counts=counts, context_ids=context_ids,
                  context_totals=np.add.reduceat(counts, start),
                  context_gamma=np.add.reduceat(per_ngram_discount, start), discounts=d)


def _lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """values[i] where keys[i] == query, else 0 (keys sorted)."""
    if len(keys) == 0:
        return np.zeros(len(queries), values.dtype)
    idx = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return np.where(keys[idx] == queries, values[idx], 0)


@dataclasses.dataclass(frozen=True)
class KneserNeyModel:
    """A fitted model: levels[k-1] holds order k = 1 .. context + 1."""

    vocab_size: int
    context: int
    levels: tuple[_Level, ...]
    interpolate_uniform: bool

    @property
    def order(self) -> int:
        return self.context + 1


class _Counter:
    """Unique k-gram ids and raw counts of one token stream.

    Computed once per k and shared by models.
    """

    def __init__(self, tokens: np.ndarray, vocab_size: int):
        self.tokens, self.vocab_size, self._raw = np.asarray(tokens), vocab_size, {}

    def raw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._raw:
            self._raw[k] = np.unique(_ngram_ids(self.tokens, self.vocab_size, k),
                                     return_counts=True)
        return self._raw[k]

    def continuation(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """N1+(• g) for every k-gram g that has a left neighbour.

        The distinct (k+1)-grams ending in g.
        """
        higher, _ = self.raw(k + 1)
        return np.unique(higher % self.vocab_size ** k, return_counts=True)


def _fit(counter: _Counter, context: int, discount: float | None,
         interpolate_uniform: bool) -> KneserNeyModel:
    V, N = counter.vocab_size, context + 1
    _check_fits(V, N)  # the top order and the continuation counts below it both read N-grams
    levels = []
    for k in range(1, N + 1):
        ids, counts = counter.raw(k) if k == N else counter.continuation(k)
        levels.append(_level(ids, counts, V, discount))
    return KneserNeyModel(vocab_size=V, context=context, levels=tuple(levels),
                          interpolate_uniform=interpolate_uniform)


def fit_kneser_ney(tokens: np.ndarray, *, vocab_size: int, context: int,
                   discount: float | None = None,
                   interpolate_uniform: bool = True) -> KneserNeyModel:
    """Fit an interpolated Kneser–Ney model with `context` tokens of context (order context + 1).

    An order-N model predicts token w from its `context` = N - 1 predecessors c. With c' = c minus
    its oldest token (so the recursion shortens the context one token at a time):

        p_N(w | c) = [ max(n(c w) - D(n(c w)), 0) + γ(c) · p_{N-1}(w | c') ] / n(c •)
        γ(c)       = D1 · #{w: n(c w) = 1} + D2 · #{w: n(c w) = 2} + D3 · #{w: n(c w) >= 3}

    and p_N(w | c) = p_{N-1}(w | c') when the context was never seen (n(c •) = 0). Here n is:

      * at the top order N: the raw count of the n-gram in the training tokens;
      * at every lower order: the *continuation count* N1+(• c w), the number of distinct tokens
        seen right before (c w). This is Kneser–Ney's point: a lower-order estimate is only
        consulted when the longer context is rare, so it should measure in how many contexts w
        appears, not how often.

    The order-1 estimate (no context) interpolates with the uniform distribution over the
    vocabulary, so a token never seen in training keeps probability (`interpolate_uniform=False`
    drops that, as nltk does).

    Discounts (Chen & Goodman 1998, "modified" KN): per order, Y = n1 / (n1 + 2 n2) and
    D1 = 1 - 2Y n2/n1, D2 = 2 - 3Y n3/n2, D3 = 3 - 4Y n4/n3, where n_i counts the n-grams of that
    order whose count (raw or continuation, whichever the order uses) is exactly i. A fixed
    `discount` uses one D for all orders and counts -- that is classic interpolated KN, and what
    `nltk.lm.KneserNeyInterpolated` computes (the tests check the two agree to 1e-6 in
    log-probability).

    Args:
      tokens: (N,) int token ids in [0, vocab_size), the training stream.
      vocab_size: V.
      context: tokens of context, >= 0.
      discount: None = modified KN with per-order discounts estimated from the counts; a number in
        [0, 1] = one fixed discount everywhere (nltk's KneserNeyInterpolated(discount=...)).
      interpolate_uniform: the order-1 estimate mixes in 1/V (otherwise tokens unseen in training
        get 0).
    """
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    return _fit(_Counter(tokens, vocab_size), context, discount, interpolate_uniform)


def log_probs(model: KneserNeyModel, tokens: np.ndarray) -> np.ndarray:
    """Natural-log probability of every token of `tokens` (T,): (T,).

    Each token is given up to model.context predecessors: the token at position t is predicted
    from the min(t, context) tokens before it *in the same stream* (the first positions use
    shorter contexts), the way a causal LM scores a window.
    """
    V, T = model.vocab_size, len(tokens)
    tokens = np.asarray(tokens, np.int64)
    if T and (tokens.min() < 0 or tokens.max() >= V):
        raise ValueError(f"token ids must be in [0, {V})")
    # p[t] holds the estimate of the longest order computed so far; order k only covers t >= k - 1.
    p = np.full(T, 1.0 / V if model.interpolate_uniform else 0.0)
    for k, level in enumerate(model.levels, start=1):
        ids = _ngram_ids(tokens, V, k)  # (T - k + 1,) the k-grams ending at t = k-1 .. T-1
        if len(ids) == 0:
            break
        contexts = ids // V
        count = _lookup(level.ngram_ids, level.counts, ids)
        total = _lookup(level.context_ids, level.context_totals, contexts)
        gamma = _lookup(level.context_ids, level.context_gamma, contexts)
        lower = p[k - 1 :]
        if k == 1 and not model.interpolate_uniform:
            estimate = count / total  # nltk's unigram: N1+(• w) / N1+(• •), undiscounted
        else:
            d1, d2, d3 = level.discounts
            discount = np.where(count == 1, d1, np.where(count == 2, d2, d3))
            estimate = ((np.maximum(count - discount, 0.0) + gamma * lower)
                        / np.maximum(total, 1.0))
        p[k - 1 :] = np.where(total > 0, estimate, lower)  # unseen context: back off entirely
    with np.errstate(divide="ignore"):
        return np.log(p)


def evaluate(model: KneserNeyModel, tokens: np.ndarray) -> dict[str, float]:
    """Mean loss over `tokens` in nats/token, perplexity and bits/token."""
    loss = float(-np.mean(log_probs(model, tokens)))
    return {"loss": loss, "ppl": math.exp(loss), "bpc": loss / math.log(2), "tokens": len(tokens)}


def ngram_reference_rows(train: np.ndarray, val: np.ndarray, *, vocab_size: int,
                         contexts: Sequence[int] = (0, 1, 2, 3, 4, 5),
                         discount: float | None = None) -> list[dict]:
    """Fit one model per context length on `train`, score each on `val`: one row per model.

    Rows: name ("KN 5-gram (4 tokens of context)"), context, order, val_loss (nats/token), val_ppl,
    val_bpc, fit_s, score_s. Models share the n-gram counting, so a sweep costs little more than its
    largest order.
    """
    counter = _Counter(train, vocab_size)
    rows = []
    for context in contexts:
        t0 = time.perf_counter()
        model = _fit(counter, int(context), discount, True)
        t1 = time.perf_counter()
        result = evaluate(model, val)
        t2 = time.perf_counter()
        rows.append(dict(name=(f"KN {context + 1}-gram "
                               f"({context} token{'s' if context != 1 else ''} of context)"),
                         context=int(context), order=int(context) + 1, val_loss=result["loss"],
                         val_ppl=result["ppl"], val_bpc=result["bpc"], fit_s=t1 - t0,
                         score_s=t2 - t1))
    return rows
