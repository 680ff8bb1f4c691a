"""Kneser–Ney n-gram baselines: a hand-worked example, normalisation, and agreement with nltk.lm."""

import math

import numpy as np
import pytest

from grassjax.baselines import ngram
from tests.conftest import generated_text


def _encode(text, chars):
    index = {c: i for i, c in enumerate(chars)}
    return np.array([index[c] for c in text], np.int64)


def test_hand_worked_bigram():
    # Train "aaab", V = 2 (a=0, b=1), one token of context, fixed D = 1/2.
    # Order 1 uses continuation counts: the bigram types {aa, ab} give N1+(•a) = N1+(•b) = 1, total 2,
    #   γ = D * 2 types = 1, so p1(a) = (1 - 1/2 + 1 * 1/2) / 2 = 1/2 = p1(b).
    # Order 2 uses raw counts: n(aa) = 2, n(ab) = 1, n(a•) = 3, γ(a) = D * 2 = 1:
    #   p(a|a) = (2 - 1/2 + 1 * 1/2) / 3 = 2/3, p(b|a) = (1 - 1/2 + 1/2) / 3 = 1/3.
    # Context "b" is never followed by anything in training: p(·|b) = p1 = 1/2.
    model = ngram.fit_kneser_ney(np.array([0, 0, 0, 1]), vocab_size=2, context=1, discount=0.5)
    got = ngram.log_probs(model, np.array([0, 1, 0, 0]))  # "abaa": a | -, b | a, a | b, a | a
    np.testing.assert_allclose(np.exp(got), [1 / 2, 1 / 3, 1 / 2, 2 / 3], rtol=1e-12)
    result = ngram.evaluate(model, np.array([0, 1, 0, 0]))
    expected = -(2 * math.log(1 / 2) + math.log(1 / 3) + math.log(2 / 3)) / 4
    assert result["loss"] == pytest.approx(expected, rel=1e-12)
    assert result["bpc"] == pytest.approx(expected / math.log(2)) and result["ppl"] == pytest.approx(math.exp(expected))


def test_modified_discounts_from_count_of_counts():
    # n1 = 4, n2 = 2, n3 = 1, n4 = 1: Y = 4 / (4 + 4) = 1/2, D1 = 1 - 2Y n2/n1 = 1/2,
    # D2 = 2 - 3Y n3/n2 = 5/4, D3 = 3 - 4Y n4/n3 = 1.
    counts = np.array([1, 1, 1, 1, 2, 2, 3, 4, 7])
    np.testing.assert_allclose(ngram._estimate_discounts(counts), (0.5, 1.25, 1.0))


@pytest.mark.parametrize("context", [0, 1, 3, 5])
@pytest.mark.parametrize("discount", [None, 0.3])
def test_probabilities_sum_to_one_for_every_context(context, discount):
    text = generated_text(400, seed=0)
    chars = sorted(set(text)) + ["#"]  # one character that training never shows
    model = ngram.fit_kneser_ney(_encode(text, chars), vocab_size=len(chars), context=context, discount=discount)
    rng = np.random.default_rng(0)
    contexts = [_encode(text[i : i + context], chars) for i in rng.integers(0, len(text) - context, 5)]
    contexts.append(rng.integers(0, len(chars), context))  # mostly unseen contexts
    for c in contexts:
        seqs = np.concatenate([np.tile(c, (len(chars), 1)), np.arange(len(chars))[:, None]], axis=1)
        p = np.array([math.exp(ngram.log_probs(model, s)[-1]) for s in seqs])
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
        assert p[-1] > 0  # the unseen character keeps some mass via the uniform floor


@pytest.mark.parametrize("order", [2, 3, 4])
def test_matches_nltk_kneser_ney_interpolated(order):
    from nltk.lm import KneserNeyInterpolated
    from nltk.util import everygrams

    body = generated_text(150, seed=0).lower()
    # nltk counts the n-grams that open the text as context types too; repeating the opening at the
    # end gives each of them a left neighbour, where the two definitions coincide.
    train = body + body[:order]
    chars = sorted(set(train))
    heldout = "".join(c for c in generated_text(60, seed=1).lower() if c in chars)[:250]
    heldout += "zzq qz"  # unseen contexts: nltk and we both back off to the shorter one
    heldout = "".join(c for c in heldout if c in chars)

    lm = KneserNeyInterpolated(order, discount=0.1)
    lm.fit([list(everygrams(list(train), max_len=order))], vocabulary_text=list(train))
    expected = [math.log(lm.score(w, tuple(heldout[max(0, t - order + 1) : t]) or None))
                for t, w in enumerate(heldout)]

    model = ngram.fit_kneser_ney(_encode(train, chars), vocab_size=len(chars), context=order - 1, discount=0.1,
                                 interpolate_uniform=False)
    got = ngram.log_probs(model, _encode(heldout, chars))
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_reference_rows_improve_with_context_and_refuse_overflowing_ids():
    text = generated_text(3000, seed=0)
    chars = sorted(set(text))
    tokens = _encode(text, chars)
    n = int(0.9 * len(tokens))
    rows = ngram.ngram_reference_rows(tokens[:n], tokens[n:], vocab_size=len(chars), contexts=(0, 1, 2, 4))
    assert [r["order"] for r in rows] == [1, 2, 3, 5]
    losses = [r["val_loss"] for r in rows]
    assert losses == sorted(losses, reverse=True) and losses[0] < math.log(len(chars))
    assert rows[-1]["val_bpc"] == pytest.approx(losses[-1] / math.log(2))
    with pytest.raises(ValueError, match="int64"):
        ngram.fit_kneser_ney(tokens, vocab_size=30522, context=5)


def test_ngram_experiment_writes_table_and_json(tmp_path, text_data_dir):
    import json

    from tests.test_train import run

    result = run("ngram_shakespeare", tmp_path / "ng", text_data_dir, ngram__contexts="0,2,4")
    saved = json.loads((tmp_path / "ng" / "ngram.json").read_text())
    assert [r["context"] for r in saved["rows"]] == [0, 2, 4] == [r["context"] for r in result["rows"]]
    table = (tmp_path / "ng" / "ngram.md").read_text()
    assert "| KN 5-gram (4 tokens of context) |" in table and "modified Kneser-Ney" in table
    fixed = run("ngram_shakespeare", tmp_path / "ng2", text_data_dir, ngram__contexts="2", ngram__discount="0.75")
    assert fixed["rows"][0]["val_loss"] != result["rows"][1]["val_loss"]  # the discount option is used


def fake_result(loss, steps=(5, 10)):
    from grassjax.train.loop import TrainResult

    history = [{"step": s, "val/loss": loss + 1.0 / s} for s in steps]
    return TrainResult(workdir="", final_step=steps[-1], best_val_loss=loss + 1.0 / steps[-1], final_val_loss=loss,
                       wall_time_s=1.0, compile_time_s=0.1, step_time_ms=10.0, tokens_per_s=100.0,
                       step_memory_bytes=2**20, step_flops=1e9, params={"total": 1000, "non_embedding": 800},
                       sample="x", history=history)


def fake_evals(losses):
    """What grassjax.inference.evaluate_run returns, per arm and seed: the whole-split val loss."""
    return {arm: [{"loss": x, "tokens_scored": 1000} for x in values] for arm, values in losses.items()}


def test_comparison_report_has_ngram_rows_and_plot_lines(tmp_path, monkeypatch):
    import matplotlib.axes

    from grassjax.studies import compare

    results = {"grassmann": [fake_result(2.2)], "transformer": [fake_result(1.9)]}
    rows = compare.summarise(results, fake_evals({"grassmann": [2.3], "transformer": [2.0]}))
    ngram_rows = [dict(name="KN 6-gram (5 tokens of context)", context=5, order=6, val_loss=1.5, val_ppl=math.exp(1.5),
                       val_bpc=1.5 / math.log(2), fit_s=0.1, score_s=0.2)]
    text = compare.report_markdown(rows, {}, exp_name="x", steps=10, baseline="transformer", ngram_rows=ngram_rows)
    line = next(l for l in text.splitlines() if l.startswith("| KN 6-gram"))
    assert "| 1.5000 |" in line and f"{100 * (1.5 / 2.0 - 1):+.2f}%" in line  # gap against the transformer's 2.0
    drawn = []
    original = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline",
                        lambda self, y=0, *a, **k: drawn.append((y, k.get("label"))) or original(self, y, *a, **k))
    compare.plot_report(results, tmp_path, ngram_rows)
    assert drawn == [(1.5, "6-gram KN (1.500)")]
