"""`python -m cellcls.search`: an Optuna search over train settings that resumes and prunes.

Current Optuna is driven directly: the Hydra Optuna sweeper plugin pins Optuna < 3 and cannot
prune (see the README). Every trial is a train run in `<search folder>/<trial number>/`, laid out
like a multirun job (.hydra/, csv/metrics.csv, metrics.json, job.json), so `cellcls.summary`
summarises the search as it does a sweep. The study is stored in `<search folder>/optuna.db`;
the same command with `hydra.run.dir=<search folder>` resumes it.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.trial import TrialState

from cellcls.cv import cross_validate
from cellcls.run.cli import entry
from cellcls.summary import record_job, write_summary
from cellcls.train import train

log = logging.getLogger(__name__)


class OptunaPruning(L.Callback):
    """Report `monitor` to the trial after every validation; stop a trial the pruner rejects."""

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        self.trial = trial
        self.monitor = monitor

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        self.trial.report(float(value), trainer.current_epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(
                f"{self.monitor}={float(value):.4f} at epoch {trainer.current_epoch + 1}"
            )


def requeue_interrupted(study: optuna.Study) -> int:
    """Mark trials left running by an interrupted search failed, and queue their values again."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params)
        log.info("Trial %d was interrupted; it runs again with the same values.", trial.number)
    return len(running)


def run_trial(cfg: DictConfig, trial: optuna.Trial, out_dir: Path) -> dict[str, Any]:
    """Train with the trial's values in `out_dir/<number>/`; tell the study how it ended."""
    job_dir = out_dir / str(trial.number)
    run_cfg = copy.deepcopy(cfg)
    with open_dict(run_cfg):
        del run_cfg["hparams_search"]
        for key, value in trial.params.items():
            OmegaConf.update(run_cfg, key, value, merge=False)
        run_cfg.paths.output_dir = str(job_dir)
    overrides = [f"{key}={value}" for key, value in trial.params.items()]
    (job_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(run_cfg, job_dir / ".hydra" / "config.yaml", resolve=True)
    OmegaConf.save(OmegaConf.create(overrides), job_dir / ".hydra" / "overrides.yaml")
    log.info("Trial %d: %s -> %s", trial.number, " ".join(overrides), job_dir)

    start, error = time.perf_counter(), ""
    try:
        if cfg.data.get("folds"):  # the cross-validated estimate: K runs per trial, no pruning
            with open_dict(run_cfg):
                run_cfg.data.fold, run_cfg.test = None, False
            value = cross_validate(run_cfg)["oof_accuracy"]
        else:
            metrics = train(run_cfg, [OptunaPruning(trial, cfg.hparams_search.monitor)])
            value = metrics[cfg.optimized_metric]
    except optuna.TrialPruned as pruned:
        status, error = "pruned", str(pruned)
        study_state: dict[str, Any] = {"state": TrialState.PRUNED}
    except Exception as err:  # a failed trial is recorded, and the search goes on
        log.exception("Trial %d failed", trial.number)
        status, error = "failed", f"{type(err).__name__}: {err}".splitlines()[0][:300]
        study_state = {"state": TrialState.FAIL}
    else:
        status, study_state = "completed", {"values": value}
    record_job(job_dir, status, time.perf_counter() - start, error)
    trial.study.tell(trial, **study_state)
    return {"status": status, **study_state}


def search(cfg: DictConfig) -> optuna.Study:
    """Run `hparams_search.n_trials` trials in all, counting those of an earlier, resumed run."""
    hs = cfg.hparams_search
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # optuna.db's folder
    study = optuna.create_study(
        study_name=hs.study_name,
        storage=hs.storage,
        direction=hs.direction,
        pruner=instantiate(hs.pruner),
        load_if_exists=True,
    )
    finished = len(
        study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        )
    )
    requeue_interrupted(study)
    # Seeded for this point of the study, so a resumed search does not replay its first trials.
    seed = hs.sampler.get("seed")
    study.sampler = instantiate(hs.sampler, seed=None if seed is None else seed + len(study.trials))
    space = {key: instantiate(dist) for key, dist in hs.params.items()}
    if finished:
        log.info("Resuming study %r in %s: %d trials done", hs.study_name, out_dir, finished)
    for _ in range(hs.n_trials - finished):
        run_trial(cfg, study.ask(space), out_dir)
        write_summary(out_dir, "max" if hs.direction == "maximize" else "min")
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if completed:
        best = study.best_trial
        log.info(
            "Best trial %d: %s=%.4f with %s",
            best.number,
            cfg.optimized_metric,
            best.value,
            best.params,
        )
    log.info("Summary: %s", out_dir / "summary.md")
    return study


@entry("search")
def main(cfg: DictConfig) -> None:
    search(cfg)


if __name__ == "__main__":
    main()
