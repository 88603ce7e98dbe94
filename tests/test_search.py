"""`python -m cellcls.search`: Optuna trials on generated data, resumed from the SQLite file."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from optuna.trial import TrialState

from cellcls.search import OptunaPruning, main
from tests.conftest import CONF_DIR, FAST, compose_run

TINY = ["data.n_train=8", "data.n_test=2", "data.image_size=32", "trainer.max_epochs=1"]
OPTIONS = sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*.yaml"))


def search_space(
    overrides: list[str] | None = None,
) -> dict[str, optuna.distributions.BaseDistribution]:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("search", overrides=overrides or [])
    return {key: instantiate(dist) for key, dist in cfg.hparams_search.params.items()}


@pytest.mark.parametrize("option", OPTIONS)
def test_search_config_instantiates(option: str) -> None:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("search", overrides=[f"hparams_search={option}"])
    hs = cfg.hparams_search
    assert isinstance(instantiate(hs.sampler), optuna.samplers.BaseSampler)
    assert isinstance(instantiate(hs.pruner), optuna.pruners.BasePruner)
    space = search_space([f"hparams_search={option}"])
    assert {"model.optimizer.lr", "data.batch_size", "model.optimizer.weight_decay"} <= set(space)
    assert {"model.net.channels", "model.net.hidden"} <= set(space)


def test_pruning_callback_stops_a_bad_trial() -> None:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(0.9))
    trial = study.ask()
    trainer = SimpleNamespace(
        callback_metrics={"val/acc": torch.tensor(0.5)}, sanity_checking=False, current_epoch=1
    )
    with pytest.raises(optuna.TrialPruned):
        OptunaPruning(trial, "val/acc").on_validation_end(trainer, None)  # type: ignore[arg-type]
    assert trial.study.trials[0].intermediate_values == {1: 0.5}


def run_search(out: Path, *overrides: str) -> None:
    """`python -m cellcls.search` in this process (each run, like a new process, reads the
    study back from its SQLite file)."""
    main.__wrapped__(compose_run([*FAST, *TINY, *overrides], out, "search"))


@pytest.mark.slow
def test_search_runs_and_resumes(in_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = in_tmp / "outputs" / "search"
    run_search(out, "hparams_search.n_trials=1")
    storage = f"sqlite:///{out / 'optuna.db'}"
    study = optuna.load_study(study_name="smallcnn", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    assert (out / "0" / "metrics.json").is_file() and (out / "0" / "csv" / "metrics.csv").is_file()

    # A search killed in the middle of a trial leaves it running in the database.
    interrupted = study.ask(search_space())
    with caplog.at_level(logging.INFO):
        run_search(out, "hparams_search.n_trials=2")
    assert "Resuming study 'smallcnn'" in caplog.text
    trials = optuna.load_study(study_name="smallcnn", storage=storage).trials
    states = [t.state for t in trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[2].params == interrupted.params  # the interrupted trial ran again
    with (out / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["job"] for r in rows) == ["0", "2"]
    assert all(r["status"] == "completed" and r["val/acc_best"] for r in rows)
    values = [float(r["val/acc_best"]) for r in rows]
    assert values == sorted(values, reverse=True)


@pytest.mark.slow
def test_search_on_cross_validation(in_tmp: Path) -> None:
    """data.folds=K: a trial's value is its pooled out-of-fold accuracy."""
    out = in_tmp / "outputs" / "search"
    run_search(out, "hparams_search.n_trials=1", "data.folds=2")
    cv = json.loads((out / "0" / "cv_metrics.json").read_text())
    assert cv["folds"] == 2 and (out / "0" / "fold_1" / "fold.json").is_file()
    study = optuna.load_study(study_name="smallcnn", storage=f"sqlite:///{out / 'optuna.db'}")
    assert study.trials[0].value == pytest.approx(cv["oof_accuracy"])
    assert "test_ensemble_accuracy" not in cv  # trials choose; TEST is not scored
