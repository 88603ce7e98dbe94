"""`python -m cellcls.predict ckpt_path=PATH inputs=DIR_OR_FILE`: classify new images (with
`ckpt_path=[A,B,...]`, by the average of several checkpoints' probabilities).

Writes `predictions.csv` (path, predicted class, one probability per class) in the run folder
for every image that could be read, and `unreadable.csv` for those that could not: one bad file
never stops the others. The model runs in Lightning's `Trainer.predict`, so device and precision
are chosen as for training (`trainer.*` settings apply). With `report.gradcam=true`, also
`gradcam.png`: Grad-CAM heat maps of the most confident images of each predicted class.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS

from cellcls.core.errors import CellclsError, is_whole, require, require_given
from cellcls.data.datasets import ImageFiles, batch_as_is
from cellcls.data.decode import list_unreadable, write_unreadable
from cellcls.reports.gradcam import write_gradcam
from cellcls.reports.metrics import write_predictions
from cellcls.run.checkpoint import restore
from cellcls.run.cli import entry

log = logging.getLogger(__name__)


def find_images(inputs: str | Path) -> list[str]:
    """A file as it is, or the image files (by extension) anywhere under a folder, sorted."""
    inputs = Path(inputs).expanduser()
    if inputs.is_file():
        return [str(inputs)]
    if not inputs.is_dir():
        raise CellclsError(f"inputs '{inputs}' does not exist (give an image file or a folder).")
    files = sorted(p for p in inputs.rglob("*") if p.is_file())
    images = [str(p) for p in files if p.suffix.lower() in IMG_EXTENSIONS]
    if len(images) < len(files):
        log.warning(
            "Ignoring %d file(s) that are not images by extension.", len(files) - len(images)
        )
    if not images:
        raise CellclsError(f"inputs '{inputs}' holds no images ({', '.join(IMG_EXTENSIONS)}).")
    return images


def check(cfg: DictConfig) -> None:
    """The settings `predict` needs, refused before any work."""
    require_given(cfg, ["ckpt_path", "inputs"], "python -m cellcls.predict ckpt_path=… inputs=…")
    require(is_whole(cfg.batch_size, 1), "batch_size", cfg.batch_size, "an integer >= 1")
    require(isinstance(cfg.tta, bool), "tta", cfg.tta, "true or false")
    report = cfg.report
    require(isinstance(report.gradcam, bool), "report.gradcam", report.gradcam, "true or false")
    per_class = report.gradcam_per_class
    require(is_whole(per_class, 1), "report.gradcam_per_class", per_class, "an integer >= 1")


def predict(cfg: DictConfig, out: Path) -> None:
    """predictions.csv for every readable image in `cfg.inputs`, unreadable.csv for the rest."""
    check(cfg)
    report = cfg.report
    restored = restore(cfg.ckpt_path, data=False, ensemble=True)
    model, classes = restored.model, restored.model.classes
    data = restored.config.data
    images = ImageFiles(find_images(cfg.inputs), data.image_size, data.get("crop"))
    # Decoded a batch at a time, on all cores, in this process (see ImageFiles).
    loader = DataLoader(images, batch_size=cfg.batch_size, collate_fn=batch_as_is)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    model.tta = cfg.tta  # averages over flips and rotations in predict_step
    batches = trainer.predict(model, dataloaders=loader)
    probs = torch.cat(batches).cpu().numpy() if batches else np.empty((0, len(classes)))
    keep = [i for i, path in enumerate(images.paths) if path not in images.unreadable]
    done = [images.paths[i] for i in keep]

    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions.csv", done, probs[keep], classes)
    log.info("Predictions for %d image(s): %s", len(done), out / "predictions.csv")
    if report.gradcam:  # on the trainer's device: Lightning hands the model back on the CPU
        model.to(trainer.strategy.root_device)

        def load(picked: list[int]) -> torch.Tensor:  # decoded again: only the few shown
            return torch.stack([images[keep[i]] for i in picked])

        per_class = report.gradcam_per_class
        write_gradcam(out / "gradcam.png", model, load, probs[keep], classes, None, per_class, done)
    if images.unreadable:
        write_unreadable(out / "unreadable.csv", images.unreadable)
        log.warning(
            "%d file(s) could not be read (unreadable.csv):\n%s",
            len(images.unreadable),
            list_unreadable(images.unreadable),
        )


@entry("predict", check)
def main(cfg: DictConfig) -> None:
    predict(cfg, Path(cfg.paths.output_dir))


if __name__ == "__main__":
    main()
