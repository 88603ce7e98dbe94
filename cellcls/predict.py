"""`python -m cellcls.predict ckpt_path=PATH inputs=DIR_OR_FILE`: classify new images (with
`ckpt_path=[A,B,...]`, by the average of several checkpoints' probabilities; an export folder
works too, and `backend=onnx` runs its model.onnx).

The Python API (`cellcls.load_classifier`) on a folder: writes `predictions.csv` (path,
predicted class, one probability per class; with `coverage=0.95`, the `set` of classes at that
level, with `abstain=0.95`, `unsure` 1 or 0, and with `ood=0.05`, `ood` 1 or 0 and the
`ood_score` it thresholds: docs/trust.md) in the run folder
for every image that could be read, and `unreadable.csv` for those that could not: one bad file
never stops the others.
With `report.gradcam=true`, also `gradcam.png`: Grad-CAM heat maps of the most confident images
of each predicted class.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cellcls.core.errors import CellclsError, is_level, is_whole, require, require_given
from cellcls.data.decode import list_unreadable, write_unreadable
from cellcls.data.layout import find_images
from cellcls.inference import AUTOCAST, BACKENDS, load_classifier
from cellcls.reports.gradcam import write_gradcam
from cellcls.reports.metrics import write_predictions
from cellcls.run.cli import entry

log = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    """The settings `predict` needs, refused before any work."""
    require_given(cfg, ["ckpt_path", "inputs"], "python -m cellcls.predict ckpt_path=… inputs=…")
    require(is_whole(cfg.batch_size, 1), "batch_size", cfg.batch_size, "an integer >= 1")
    require(isinstance(cfg.tta, bool), "tta", cfg.tta, "true or false")
    require(cfg.backend in BACKENDS, "backend", cfg.backend, " or ".join(BACKENDS))
    precisions = ("auto", *AUTOCAST)
    require(cfg.precision in precisions, "precision", cfg.precision, ", ".join(precisions))
    for name in ("coverage", "abstain", "ood"):
        value = cfg[name]
        ok = value is None or is_level(value)
        require(ok, name, value, "null or a level between 0 and 1 (exclusive), e.g. 0.95")
    require(isinstance(cfg.mondrian, bool), "mondrian", cfg.mondrian, "true or false")
    report = cfg.report
    require(isinstance(report.gradcam, bool), "report.gradcam", report.gradcam, "true or false")
    per_class = report.gradcam_per_class
    require(is_whole(per_class, 1), "report.gradcam_per_class", per_class, "an integer >= 1")


def predict(cfg: DictConfig, out: Path) -> None:
    """predictions.csv for every readable image in `cfg.inputs`, unreadable.csv for the rest."""
    check(cfg)
    report = cfg.report
    ckpt = cfg.ckpt_path
    ckpt = OmegaConf.to_container(ckpt) if OmegaConf.is_list(ckpt) else ckpt
    clf = load_classifier(ckpt, cfg.device, cfg.precision, cfg.backend, cfg.conformal)
    results = clf.predict(
        find_images(cfg.inputs),
        cfg.batch_size,
        cfg.tta,
        progress=True,
        coverage=cfg.coverage,
        mondrian=cfg.mondrian,
        abstain=cfg.abstain,
        ood=cfg.ood,
    )
    done = [r for r in results if r.error is None]
    bad = {r.source: r.error for r in results if r.error is not None}
    probs = np.array([[r.probabilities[c] for c in clf.classes] for r in done])
    paths = [r.source for r in done]

    out.mkdir(parents=True, exist_ok=True)
    extra = {}
    if cfg.coverage is not None:  # the classes of each set, "|"-separated
        extra["set"] = ["|".join(r.set) for r in done]
    if cfg.abstain is not None:
        extra["unsure"] = [int(r.unsure) for r in done]
    if cfg.ood is not None:
        extra["ood"] = [int(r.ood) for r in done]
        extra["ood_score"] = [f"{r.ood_score:.6g}" for r in done]
    probs = probs.reshape(-1, len(clf.classes))
    write_predictions(out / "predictions.csv", paths, probs, clf.classes, extra=extra)
    log.info("Predictions for %d image(s): %s", len(done), out / "predictions.csv")
    if report.gradcam:
        if clf.model is None:
            raise CellclsError("report.gradcam=true needs the torch model: give backend=torch.")

        def load(picked: list[int]) -> torch.Tensor:  # decoded again: only the few shown
            cells = clf.cells([paths[i] for i in picked])
            return torch.from_numpy(np.stack([c.image for c in cells])).permute(0, 3, 1, 2)

        per_class = report.gradcam_per_class
        write_gradcam(
            out / "gradcam.png", clf.model, load, probs, clf.classes, None, per_class, paths
        )
    if bad:
        write_unreadable(out / "unreadable.csv", bad)
        log.warning(
            "%d file(s) could not be read (unreadable.csv):\n%s", len(bad), list_unreadable(bad)
        )


@entry("predict", check)
def main(cfg: DictConfig) -> None:
    predict(cfg, Path(cfg.paths.output_dir))


if __name__ == "__main__":
    main()
