"""The n-gram baselines as an experiment, and as reference lines for the comparison reports.

Both fit on the training split and score the validation split of the very dataset the LMs train on
(`grassjax.data.load_dataset`, the same `data.val_fraction`), so the numbers sit on one scale.
The LMs' val loss is a mean over random `block_size` windows (early positions see short contexts);
the n-gram's is over every validation token with up to `context` tokens before it -- a model that
never looks further back than 5 characters is not hurt by that difference.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Callable

from grassjax.baselines.ngram import ngram_reference_rows


def fit_ngram_lines(config, *, contexts, data_dir: str | None = None,
                    discount: float | None = None, split: str = "val") -> list[dict]:
    """n-gram rows (see `ngram_reference_rows`) fitted on config.data's training split and scored on
    `split`; [] when contexts is empty.
    """
    if not contexts:
        return []
    from grassjax.data import load_dataset

    dataset = load_dataset(config.data, data_dir)
    return ngram_reference_rows(dataset.train, getattr(dataset, split),
                                vocab_size=dataset.vocab.size,
                                contexts=tuple(contexts), discount=discount)


def ngram_table_markdown(rows: list[dict]) -> str:
    lines = ["| model | val loss (nats/token) | perplexity | bits/token | fit (s) | score (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['val_loss']:.4f} | {r['val_ppl']:.3f} | {r['val_bpc']:.3f} | "
              f"{r['fit_s']:.2f} | {r['score_s']:.2f} |" for r in rows]
    return "\n".join(lines)


def run_ngram_baselines(config, *, workdir, exp_name: str, data_dir: str | None = None,
                        wandb_mode: str | None = None,
                        print_fn: Callable[[str], None] = print) -> dict:
    """Fit and score every context length in config.ngram.contexts.

    Writes ngram.json and ngram.md in workdir.
    """
    from grassjax.runlog import RunLogger

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    discount = None if config.ngram.discount < 0 else float(config.ngram.discount)
    t0 = time.perf_counter()
    rows = fit_ngram_lines(config, contexts=config.ngram.contexts, data_dir=data_dir,
                           discount=discount)
    total = time.perf_counter() - t0
    smoothing = ("modified Kneser-Ney, estimated discounts" if discount is None
                 else f"Kneser-Ney, discount {discount}")
    text = (f"# {exp_name}: interpolated {smoothing}\n\n"
            f"Fit on the training split, scored on every validation "
            f"token ({config.data.dataset}, val_fraction {config.data.val_fraction}); "
            f"{total:.1f} s in all, data loading included.\n\n"
            f"{ngram_table_markdown(rows)}\n")
    (workdir / "ngram.md").write_text(text)
    (workdir / "ngram.json").write_text(json.dumps({"rows": rows, "total_s": total,
                                                    "smoothing": smoothing,
                                                    "dataset": config.data.dataset}, indent=2))
    columns = list(rows[0]) if rows else []
    with RunLogger(workdir=workdir, project=config.wandb.project,
                   name=config.wandb.name or exp_name, group=config.wandb.group or exp_name,
                   tags=list(config.wandb.tags) + ["ngram"], config=config.to_dict(),
                   mode=wandb_mode, job_type="baseline", print_fn=print_fn) as logger:
        if rows:
            logger.log_table("ngram", columns, [[r[c] for c in columns] for r in rows], step=0)
            logger.set_summary({f"val/loss/ctx{r['context']}": r["val_loss"] for r in rows})
    print_fn(text)
    return {"rows": rows, "total_s": total}
