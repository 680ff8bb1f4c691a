"""Learning-rate search: persistent study, pruning, resuming an interrupted trial, the missing-extra message."""

import json
import sys

import pytest

from tests.test_train import run


def test_missing_optuna_names_the_extra(monkeypatch):
    from grassjax.extras import MissingExtraError
    from grassjax.studies import tune

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install -e \.\[tune\]"):
        tune.import_optuna()


def new_study(workdir):
    """An empty tune_shakespeare study in workdir/study.db, as the experiment names and stores it."""
    optuna = pytest.importorskip("optuna")
    workdir.mkdir()
    return optuna.create_study(study_name="tune_shakespeare", storage=f"sqlite:///{workdir / 'study.db'}",
                               direction="minimize")


def test_study_prunes_resumes_interrupted_trials_and_continues(tmp_path, text_data_dir):
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    workdir = tmp_path / "tune"
    study = new_study(workdir)
    # A trial an earlier invocation left running (killed): it must be closed and its learning rate rerun
    # in its own folder.
    stale = study.ask({"learning_rate": FloatDistribution(1e-6, 1e-1, log=True)})
    stale.set_user_attr("workdir", str(workdir / "trials" / "killed"))
    # Then a good learning rate, and one so small it learns nothing: the pruner must stop it.
    study.enqueue_trial({"learning_rate": 1e-2})
    study.enqueue_trial({"learning_rate": 1e-6})
    del study

    tiny = dict(tune__lr_min=1e-6, tune__lr_max=1e-1, tune__startup_trials=1, tune__prune_warmup_steps=0,
                train__steps=6, train__eval_every=2, stats__enabled=False, train__sample_tokens=4)
    result = run("tune_shakespeare", workdir, text_data_dir, tune__n_trials=3, **tiny)
    trials = {r["number"]: r for r in result["rows"]}
    assert trials[0]["state"] == "FAIL"  # the stale one, closed
    assert trials[1]["state"] == "COMPLETE" and trials[1]["learning_rate"] == 1e-2
    assert trials[2]["state"] == "PRUNED" and trials[2]["final_step"] < 6  # 1e-6 falls behind the median
    assert trials[3]["learning_rate"] == trials[0]["learning_rate"] and trials[3]["workdir"].endswith("killed")
    assert (workdir / "trials" / "killed" / "result.json").exists()

    # Rerunning the command finds the study finished: nothing is redone.
    again = run("tune_shakespeare", workdir, text_data_dir, tune__n_trials=3, **tiny)
    assert [(r["number"], r["state"]) for r in again["rows"]] == [(r["number"], r["state"]) for r in result["rows"]]
    saved = json.loads((workdir / "tune.json").read_text())
    assert saved["best"]["value"] == min(r["best_val_loss"] for r in again["rows"] if r["state"] == "COMPLETE")
    assert "| trial | state | learning rate |" in (workdir / "tune.md").read_text()


def test_first_lrs_are_tried_first_in_order(tmp_path, text_data_dir):
    pytest.importorskip("optuna")
    tiny = dict(tune__startup_trials=1, tune__prune=False, train__steps=2, train__eval_every=2,
                stats__enabled=False, train__sample_tokens=4)
    result = run("tune_shakespeare", tmp_path / "tune", text_data_dir, tune__n_trials=3,
                 tune__first_lrs=(3e-3, 1e-3), **tiny)
    lrs = [r["learning_rate"] for r in sorted(result["rows"], key=lambda r: r["number"])]
    assert lrs[:2] == [3e-3, 1e-3] and len(lrs) == 3
    # Rerun with one more point and one more trial: only the new point is trained.
    again = run("tune_shakespeare", tmp_path / "tune", text_data_dir, tune__n_trials=4,
                tune__first_lrs=(3e-3, 1e-3, 5e-3), **tiny)
    assert [r["learning_rate"] for r in sorted(again["rows"], key=lambda r: r["number"])] == lrs + [5e-3]
