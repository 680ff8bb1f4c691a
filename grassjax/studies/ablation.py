"""The ablation's waterfall: how much of a reference arm's gap to the baseline each arm closes."""

from __future__ import annotations

import math


def describe_change(changes: dict) -> str:
    """An arm's changes as one short string, e.g.
    "offsets=(1, 2); offsets_per_layer=True; train.learning_rate=0.002"."""
    flat = {}
    for k, v in changes.items():
        flat.update({f"train.{tk}": tv for tk, tv in v.items()} if k == "train" else {k: v})
    return "; ".join(f"{k}={tuple(v) if isinstance(v, list) else v}"
                     for k, v in flat.items()) or "(none)"


def waterfall(rows: list[dict], *, reference: str, baseline: str,
              changes: dict[str, dict] | None = None) -> list[dict]:
    """How much of the `reference` arm's gap to `baseline` each other arm closes.

    gap = L(reference) - L(baseline), L the headline val loss (best checkpoint, whole validation
    split, mean over seeds), in nats/token. For arm a, closed = L(reference) - L(a) and
    closed_share = closed / gap: 0 = no better than the reference, 1 = all the way to the baseline,
    > 1 = beyond it, < 0 = worse than the reference. closed_se is the standard error of `closed`
    from the seed spreads of both arms (0 with one seed).
    """
    by_arm = {r["arm"]: r for r in rows}
    ref, base = by_arm[reference], by_arm[baseline]
    gap = ref["val_loss"] - base["val_loss"]
    out = []
    for r in rows:
        closed = ref["val_loss"] - r["val_loss"]
        se = math.sqrt(r["val_loss_std"] ** 2 / r["seeds"]
                       + ref["val_loss_std"] ** 2 / ref["seeds"]) \
            if r["arm"] != reference else 0.0
        out.append(dict(arm=r["arm"], change=describe_change((changes or {}).get(r["arm"], {})),
                        val_loss=r["val_loss"], best_val_loss=r["best_val_loss"],
                        delta_loss=r["val_loss"] - base["val_loss"],
                        ppl_ratio=math.exp(r["val_loss"] - base["val_loss"]),
                        closed=closed, closed_se=se,
                        closed_share=closed / gap if gap != 0 else math.nan))
    return out


def waterfall_markdown(steps: list[dict], *, reference: str, baseline: str) -> str:
    gap = next(s for s in steps if s["arm"] == baseline)["closed"]
    lines = [f"## Waterfall: how much of the `{reference}` → `{baseline}` gap each arm closes",
             "",
             f"Gap = L({reference}) − L({baseline}) = {gap:+.4f} nats/token "
             f"(ppl ratio {math.exp(gap):.3f}), L the "
             "val loss over the whole split. closed = L({0}) − L(arm), ± its standard error "
             "over seeds; share = closed / gap (1 = matches the baseline, negative = worse than "
             "the reference).".format(reference), "",
             "| arm | change from the base config | val loss | Δ vs baseline | ppl ratio "
             "| closed (nats) | share of gap closed |", "|---|---|---|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s['arm']} | {s['change']} | {s['val_loss']:.4f} | "
                     f"{s['delta_loss']:+.4f} | {s['ppl_ratio']:.3f} | "
                     f"{s['closed']:+.4f} ± {s['closed_se']:.4f} | "
                     f"{100 * s['closed_share']:+.1f}% |")
    return "\n".join(lines)
