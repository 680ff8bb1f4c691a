"""Learning-rate search with Optuna: a persistent study, median pruning, one W&B run per trial.

The study lives in <workdir>/study.db (SQLite), so rerunning the same command continues it (see
run_tuning). Optuna is an optional dependency: `pip install -e .[tune]`.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Callable

import ml_collections

from grassjax.extras import require
from grassjax.train.loop import NonFiniteLossError, train
from grassjax.train.workdir import WorkdirLock, prepare_workdir


def import_optuna():
    return require("optuna", extra="tune", feature="tuning")


def trial_config(config, *, learning_rate: float, number: int, exp_name: str,
                 group: str) -> ml_collections.ConfigDict:
    """The single-run config of one trial."""
    cfg = ml_collections.ConfigDict(config.to_dict())
    ratio = config.tune.min_lr_ratio
    del cfg.tune
    cfg.train.learning_rate = float(learning_rate)
    cfg.train.min_lr = float(learning_rate) * ratio
    cfg.wandb.group = group
    cfg.wandb.name = f"{exp_name}-trial{number:03d}"
    cfg.wandb.tags = tuple(cfg.wandb.tags) + ("tune",)
    return cfg


def run_tuning(config, *, workdir, exp_name: str, data_dir: str | None = None,
               wandb_mode: str | None = None,
               print_fn: Callable[[str], None] = print) -> dict:
    """Run (or continue) the study until tune.n_trials trials are complete or pruned; write
    tune.md/json.

    Rerunning the same command continues the study in <workdir>/study.db: finished trials are kept,
    and until `tune.n_trials` trials have completed or been pruned, new ones are asked for. A trial
    that an earlier invocation left unfinished (Ctrl-C, a killed process) is closed as failed and
    its learning rate queued again, in the same trial folder, so its training resumes from its
    checkpoint. The study's folder is locked as a run's is (<workdir>/lock): a second process on the
    same study is one line, before it touches the study.

    Each trial is an ordinary `train` run in <workdir>/trials/trialNNN with the learning rate (and
    min_lr = lr x tune.min_lr_ratio) set; all trials share one W&B group. After every evaluation
    the trial reports its val loss, and the median pruner stops it when it is worse than the median
    of earlier trials at the same step. A diverged trial (non-finite loss) is recorded as failed.
    """
    optuna = import_optuna()
    workdir = prepare_workdir(pathlib.Path(workdir))
    with WorkdirLock(workdir):  # another process's live trials are not an interrupted run's
        study = _open_study(config, optuna, workdir, exp_name, print_fn)
        _run_trials(study, config, workdir, exp_name, data_dir, wandb_mode, print_fn)
        return _write_report(study, workdir, exp_name, print_fn)


def _open_study(config, optuna, workdir: pathlib.Path, exp_name: str, print_fn):
    """The study in <workdir>/study.db, with the chosen first points queued and the trials an
    interrupted invocation left running queued again."""
    from optuna.trial import TrialState

    tc = config.tune
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(workdir / 'study.db').resolve()}"
    name = tc.study_name or exp_name
    existing = name in optuna.get_all_study_names(storage)
    num_before = len(optuna.load_study(study_name=name, storage=storage).trials) if existing else 0
    # Offset the sampler's seed by the trials already run: a resumed study must not replay its first
    # proposals.
    sampler = optuna.samplers.TPESampler(seed=tc.seed + num_before,
                                         n_startup_trials=tc.startup_trials)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=tc.startup_trials,
                                          n_warmup_steps=tc.prune_warmup_steps)
              if tc.prune else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                direction="minimize", sampler=sampler, pruner=pruner)
    # Chosen points first (e.g. a grid around the recipe's rate), each once per study, then the
    # sampler; rerunning with one more entry (and one more trial) extends the grid.
    tried = {t.params.get("learning_rate") for t in study.get_trials(deepcopy=False)}
    for lr in tc.get("first_lrs", ()):
        if float(lr) not in tried:
            study.enqueue_trial({"learning_rate": float(lr)})
    # left by an interrupted run
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(stale.number, state=TrialState.FAIL)
        study.enqueue_trial(stale.params,
                            user_attrs={"resume_dir": stale.user_attrs.get("workdir", "")})
        print_fn(f"trial {stale.number} was interrupted: queued again (learning rate "
                 f"{stale.params}), resuming from its checkpoint")
    return study


def _run_trials(study, config, workdir: pathlib.Path, exp_name: str, data_dir, wandb_mode,
                print_fn):
    """Ask for trials and train them until tune.n_trials are complete or pruned."""
    from optuna.trial import TrialState

    tc = config.tune
    group = config.wandb.group or exp_name
    finished = lambda: len(study.get_trials(deepcopy=False,
                                            states=(TrialState.COMPLETE, TrialState.PRUNED)))
    while finished() < tc.n_trials:
        trial = study.ask()
        lr = trial.suggest_float("learning_rate", tc.lr_min, tc.lr_max, log=True)
        trial_dir = (trial.user_attrs.get("resume_dir")
                     or str(workdir / "trials" / f"trial{trial.number:03d}"))
        trial.set_user_attr("workdir", trial_dir)
        cfg = trial_config(config, learning_rate=lr, number=trial.number, exp_name=exp_name,
                           group=group)
        print_fn(f"== {exp_name}: trial {trial.number}, learning rate {lr:.3g} "
                 f"({finished()}/{tc.n_trials} done) ==")

        def on_eval(step, metrics, trial=trial):
            trial.report(metrics["val/loss"], step)
            return trial.should_prune()

        try:
            result = train(cfg, workdir=trial_dir, exp_name=f"{exp_name}-trial{trial.number:03d}",
                           data_dir=data_dir, wandb_mode=wandb_mode, print_fn=print_fn,
                           on_eval=on_eval)
        except NonFiniteLossError as err:
            trial.set_user_attr("diverged", str(err))
            study.tell(trial, state=TrialState.FAIL)
            print_fn(f"trial {trial.number} diverged: recorded as failed")
            continue
        trial.set_user_attr("final_step", result.final_step)
        if result.final_step < cfg.train.steps:
            study.tell(trial, state=TrialState.PRUNED)
            print_fn(f"trial {trial.number} pruned at step {result.final_step}")
        else:
            study.tell(trial, result.best_val_loss)


def _write_report(study, workdir: pathlib.Path, exp_name: str, print_fn) -> dict:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        values = list(t.intermediate_values.values())
        rows.append(dict(number=t.number, state=t.state.name,
                         learning_rate=t.params.get("learning_rate", math.nan),
                         best_val_loss=t.value if t.value is not None
                         else (min(values) if values else math.nan),
                         final_step=t.user_attrs.get("final_step"),
                         workdir=t.user_attrs.get("workdir", "")))
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = min(complete, key=lambda t: t.value) if complete else None
    lines = [f"# {exp_name}: learning-rate search ({len(rows)} trials)", ""]
    if best is not None:
        lines += [f"Best: trial {best.number}, learning rate {best.params['learning_rate']:.4g}, "
                  f"best val loss {best.value:.4f}.", ""]
    lines += ["| trial | state | learning rate | best val loss | steps |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["state"] != "COMPLETE", r["best_val_loss"])):
        lines.append(f"| {r['number']} | {r['state']} | {r['learning_rate']:.4g} | "
                     f"{r['best_val_loss']:.4f} | "
                     f"{r['final_step'] if r['final_step'] is not None else '—'} |")
    text = "\n".join(lines) + "\n"
    (workdir / "tune.md").write_text(text)
    summary = {"rows": rows, "best": None if best is None else {"number": best.number,
                                                                 "value": best.value,
                                                                 "params": best.params}}
    (workdir / "tune.json").write_text(json.dumps(summary, indent=2))
    print_fn(text)
    return summary
