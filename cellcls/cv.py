"""`python -m cellcls.cv`: K-fold cross-validation by source cell of any recipe, pooled out of fold.

Every source cell of TRAIN is validated exactly once, by the fold model that never saw it; the
out-of-fold (OOF) predictions over all cells are the estimate, with an interval over cells. The K
fold models then score the official TEST together (the mean of their probabilities) and one by
one. The folds run one after another; a fold that finished is kept, so an interrupted CV resumes
where it stopped (an unfinished fold resumes from its `last.ckpt`).

As parallel jobs, a multirun sweeps `data.fold` under any Hydra launcher
(`python -m cellcls.cv -m data.fold='range(5)' hydra/launcher=slurm`): each job trains one fold into
the sweep folder, and `PoolFolds`, a Hydra callback, pools them once, after the last job.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from cellcls.core.errors import CellclsError, is_whole, require
from cellcls.data.splits import HOLDOUT
from cellcls.reports.metrics import grouped_metrics, interval, reliability_bins
from cellcls.reports.plots import plot_confusion, plot_reliability
from cellcls.reports.trust import heldout_evidence
from cellcls.run.callbacks import TestReport
from cellcls.run.checkpoint import restore
from cellcls.run.cli import entry
from cellcls.train import train

log = logging.getLogger(__name__)
DONE = "fold.json"  # written into a fold's folder once its model and OOF predictions are final
CONFORMAL = "conformal.json"  # beside cv_metrics.json: the pooled out-of-fold trust evidence


def fold_config(cfg: DictConfig, fold: int, out: Path) -> DictConfig:
    """The training config of fold `fold`: the recipe, that fold held out, its own folder, no
    test (the fold models score TEST together at the end)."""
    fold_cfg = copy.deepcopy(cfg)
    with open_dict(fold_cfg):
        fold_cfg.data.fold = fold
        fold_cfg.paths.output_dir = str(out)
        fold_cfg.test, fold_cfg.optimized_metric = False, None
        last = out / "checkpoints" / "last.ckpt"
        fold_cfg.ckpt_path = str(last) if last.is_file() else None  # resume an unfinished fold
    return fold_cfg


def score(
    cfg: DictConfig,
    ckpt: str | Sequence[str],
    split: str,
    out: Path,
    trust: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Test checkpoint `ckpt` (a list: their ensemble) on `split` (`val`: the fold's held-out
    cells) with the test report into `out`; returns the report's metrics.json. `trust`: the
    held-out evidence its sets and abstention are read from (the ensemble's: conformal.json)."""
    scored = copy.deepcopy(cfg)
    with open_dict(scored):
        scored.data.split = split
    restored = restore(ckpt, scored, ensemble=True)
    if trust is not None:
        restored.model.trust = trust
    gradcam = cfg.get("report") or {}
    report = TestReport(out, checkpoint=ckpt, **gradcam)  # report.gradcam: also gradcam.png
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=[report], logger=False, enable_progress_bar=False
    )
    trainer.test(restored.model, datamodule=restored.datamodule)
    return json.loads((out / "metrics.json").read_text())


def best_checkpoint(fold_dir: Path) -> str:
    """The fold's checkpoint chosen on its held-out cells (`epoch_*.ckpt`), else `last.ckpt`."""
    best = sorted((fold_dir / "checkpoints").glob("epoch_*.ckpt"))
    return str(best[-1] if best else fold_dir / "checkpoints" / "last.ckpt")


def resume_command(out: Path) -> str:
    """This CV's own command line in its folder `out`: it keeps the finished folds and resumes
    an unfinished one from its `last.ckpt` (one fold of a multirun: that fold, in the sweep's
    folder)."""
    task = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    words = ["python", "-m", "cellcls.cv", *task, f"hydra.run.dir={out.resolve()}"]
    return shlex.join(words)


def run_fold(cfg: DictConfig, fold: int, out: Path) -> dict[str, Any]:
    """Train fold `fold` unless it is done, then score its held-out cells; returns fold.json."""
    fold_dir = out / f"fold_{fold}"
    done = fold_dir / DONE
    if done.is_file():
        log.info("Fold %d of %d is done (%s): kept.", fold, cfg.data.folds, done)
        return json.loads(done.read_text())
    log.info("Fold %d of %d: training in %s", fold, cfg.data.folds, fold_dir)
    fold_cfg = fold_config(cfg, fold, fold_dir)
    train(fold_cfg, resume=resume_command(out))
    ckpt = best_checkpoint(fold_dir)
    oof = score(fold_cfg, ckpt, "val", fold_dir / "oof")
    record = {"fold": fold, "checkpoint": ckpt, "val_accuracy": oof["accuracy"]}
    done.write_text(json.dumps(record, indent=2) + "\n")
    return record


def pool_oof(out: Path, folds: int, classes: Sequence[str]) -> list[dict[str, Any]]:
    """Every fold's held-out predictions, as one table: path, group, fold, label, predicted and
    one probability per class; each TRAIN image exactly once."""
    rows = []
    for fold in range(folds):
        with (out / f"fold_{fold}" / "oof" / "predictions.csv").open(newline="") as f:
            for r in csv.DictReader(f):
                probs = {c: float(r[c]) for c in classes}
                rows.append(
                    {"path": r["path"], "group": int(r["group"]), "fold": fold}
                    | {"label": r["label"], "predicted": r["pred"]}
                    | probs
                )
    paths = [r["path"] for r in rows]
    if len(set(paths)) != len(paths):
        raise CellclsError(f"cv: an image was held out by two folds in {out}; delete the folds")
    return rows


def oof_evidence(rows: Sequence[dict[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    """conformal.json: the held-out evidence (`cellcls.reports.trust`) of the pooled
    out-of-fold predictions, one score per TRAIN cell. Each fold's probabilities carry its own
    temperature already, so none is fitted again (1.0). It calibrates the fold ensemble's sets
    and abstention on TEST, and any model given it (predict's `conformal=`)."""
    labels = np.array([classes.index(r["label"]) for r in rows])
    probs = np.array([[r[c] for c in classes] for r in rows])
    groups = np.array([r["group"] for r in rows])
    fitted_on = "out-of-fold predictions of cellcls.cv (every cell held out by one fold)"
    return heldout_evidence(probs, labels, groups, classes, temperature=1.0, fitted_on=fitted_on)


def write_oof(out: Path, rows: Sequence[dict[str, Any]], classes: Sequence[str]) -> dict:
    """oof_predictions.csv, its metrics with an interval over cells, and its two plots."""
    with (out / "oof_predictions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "group", "fold", "label", "predicted", *classes])
        writer.writeheader()
        writer.writerows(
            {k: f"{v:.6f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows
        )
    labels = np.array([classes.index(r["label"]) for r in rows])
    probs = np.array([[r[c] for c in classes] for r in rows])
    groups = np.array([r["group"] for r in rows])
    metrics, _ = grouped_metrics(labels, probs, classes, groups)
    plot_confusion(
        np.asarray(metrics["confusion_matrix"]), classes, out / "oof_confusion_matrix.png"
    )
    bins = reliability_bins(labels, probs)
    plot_reliability(bins, metrics["calibration_error"], out / "oof_reliability.png")
    return metrics


def check_cv(cfg: DictConfig) -> None:
    """Refuse, in one line, settings that cannot make a CV."""
    require(is_whole(cfg.data.folds, 2), "data.folds", cfg.data.folds, "an integer >= 2")
    fold = cfg.data.get("fold")
    whole = fold is None or (is_whole(fold, 0) and fold < cfg.data.folds)
    require(whole, "data.fold", fold, "null (every fold) or an integer from 0 to data.folds - 1")
    if cfg.get("ckpt_path") is not None:  # each fold resumes from its own last.ckpt
        raise CellclsError(
            f"ckpt_path={cfg.ckpt_path} is cellcls.train's: cellcls.cv resumes its folds itself. "
            "Run the same cellcls.cv command again (with hydra.run.dir=<the CV's folder>)."
        )
    split = cfg.data.split != HOLDOUT or not cfg.get("test")
    require(split, "data.split", cfg.data.split, "a test folder such as TEST (or test=false)")


def cv_dir(cfg: DictConfig) -> Path:
    """Where the folds live: the run's folder; for one fold of a multirun (`-m data.fold=...`),
    the sweep's folder, which its jobs share."""
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    if cfg.data.get("fold") is not None and hydra_cfg and hydra_cfg.mode == RunMode.MULTIRUN:
        return Path(hydra_cfg.sweep.dir)
    return Path(cfg.paths.output_dir)


def cross_validate(cfg: DictConfig, train_missing: bool = True) -> dict[str, Any]:
    """Train the K folds (those not done yet), pool their held-out predictions and, unless
    `test=false`, score TEST with the fold ensemble and with each fold model. Without
    `train_missing`, a fold that is not done is refused instead of trained."""
    check_cv(cfg)
    out = Path(cfg.paths.output_dir)
    classes = list(cfg.data.classes)
    missing = [i for i in range(cfg.data.folds) if not (out / f"fold_{i}" / DONE).is_file()]
    if missing and not train_missing:
        raise CellclsError(
            f"cv: fold(s) {missing} of {cfg.data.folds} in {out} did not finish; run them again "
            f"(-m data.fold={','.join(map(str, missing))}) or drop -m to train them here"
        )
    records = [run_fold(cfg, fold, out) for fold in range(cfg.data.folds)]
    rows = pool_oof(out, cfg.data.folds, classes)
    oof = write_oof(out, rows, classes)
    conformal = oof_evidence(rows, classes)
    (out / CONFORMAL).write_text(json.dumps(conformal) + "\n")
    result: dict[str, Any] = {
        "folds": cfg.data.folds,
        "n_images": oof["n_images"],
        "n_groups": oof["n_groups"],
        "oof_accuracy": oof["accuracy"],
        "oof_accuracy_ci95": oof["accuracy_ci95"],
        "oof_balanced_accuracy": oof["balanced_accuracy"],
        "oof_balanced_accuracy_ci95": oof["balanced_accuracy_ci95"],
        "fold_accuracy": [r["val_accuracy"] for r in records],
        "calibration_error": oof["calibration_error"],
        "checkpoints": [r["checkpoint"] for r in records],
    }
    if cfg.get("test"):
        ckpts = result["checkpoints"]
        ensemble = score(cfg, ckpts, cfg.data.split, out / "test_ensemble", conformal)
        result["test_ensemble_accuracy"] = ensemble["accuracy"]
        result["test_ensemble_accuracy_ci95"] = ensemble.get("accuracy_ci95")
        sets = ensemble.get("trust", {}).get("conformal", {})
        result["test_ensemble_conformal"] = {
            level: {k: v for k, v in row.items() if k != "per_class_coverage"}
            for level, row in sets.items()
        }
        result["test_fold_accuracy"] = [
            score(cfg, c, cfg.data.split, out / f"fold_{i}" / "test")["accuracy"]
            for i, c in enumerate(ckpts)
        ]
    (out / "cv_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "cv.md").write_text(cv_table(result))
    log.info("Cross-validation in %s\n%s", out, cv_table(result))
    return result


def cv_table(r: dict[str, Any]) -> str:
    """cv.md: one row per fold (its held-out cells' accuracy, its TEST accuracy), then pooled."""
    tests = r.get("test_fold_accuracy") or [None] * r["folds"]
    lines = ["| fold | held-out accuracy | TEST accuracy |", "| --- | --- | --- |"]
    for fold, (val, test) in enumerate(zip(r["fold_accuracy"], tests, strict=True)):
        lines.append(f"| {fold} | {val:.3f} | {'-' if test is None else f'{test:.3f}'} |")
    pooled = f"| pooled out of fold | {r['oof_accuracy']:.3f} {interval(r['oof_accuracy_ci95'])} |"
    if "test_ensemble_accuracy" in r:
        t_ci = interval(r["test_ensemble_accuracy_ci95"] or (float("nan"),) * 2)
        pooled += f" ensemble {r['test_ensemble_accuracy']:.3f} {t_ci} |"
    else:
        pooled += " - |"
    note = (
        f"\n{r['n_images']} TRAIN images of {r['n_groups']} source cells, each held out once; "
        "95% intervals over cells (cluster bootstrap within class, 2,000 resamples).\n"
    )
    return "\n".join([*lines, pooled]) + "\n" + note


class PoolFolds(Callback):
    """Hydra callback: after a multirun of folds (`-m data.fold=...`), pool them once, in the
    launching process, as the sequential CV does; a multirun of whole CVs has nothing to pool."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        if not list(sweep.glob(f"fold_*/{DONE}")):
            return
        cfg = copy.deepcopy(config)
        with open_dict(cfg):
            del cfg["hydra"]
            cfg.paths.output_dir = str(sweep)
        try:
            cross_validate(cfg, train_missing=False)
        except CellclsError as err:  # a failed fold job: say which, keep the others
            log.error("%s", err)


@entry("cv", check=lambda cfg: check_cv(cfg))
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the pooled out-of-fold accuracy (with `data.fold`: that
    fold's held-out accuracy), for sweepers."""
    check_cv(cfg)
    if cfg.data.get("fold") is not None:
        return run_fold(cfg, cfg.data.fold, cv_dir(cfg))["val_accuracy"]
    return cross_validate(cfg)["oof_accuracy"]


if __name__ == "__main__":
    main()
