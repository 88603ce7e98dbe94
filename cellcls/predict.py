"""`python -m cellcls.predict ckpt_path=PATH inputs=DIR_OR_FILE`: classify new images.

Writes `predictions.csv` (path, predicted class, one probability per class) in the run folder
for every image that could be read, and `unreadable.csv` for those that could not: one bad file
never stops the others.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchvision.datasets.folder import IMG_EXTENSIONS

from cellcls.checkpoint import load_checkpoint, load_weights, saved_config
from cellcls.data.cache import load_images
from cellcls.errors import CellclsError, exit_on_user_error, is_whole, require
from cellcls.report import write_predictions

log = logging.getLogger(__name__)
# Images decoded at a time: a large folder needs little memory.
CHUNK = 1024


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


def predict(cfg: DictConfig, out: Path) -> None:
    """predictions.csv for every readable image in `cfg.inputs`, unreadable.csv for the rest."""
    for key in ("ckpt_path", "inputs"):
        if OmegaConf.is_missing(cfg, key):
            raise CellclsError(f"{key} is required: python -m cellcls.predict ckpt_path=… inputs=…")
    require(is_whole(cfg.batch_size, 1), "batch_size", cfg.batch_size, "an integer >= 1")
    ckpt = load_checkpoint(cfg.ckpt_path)
    saved = OmegaConf.create(saved_config(ckpt, cfg.ckpt_path))
    model = instantiate(saved.model, _convert_="object")
    load_weights(model, ckpt, cfg.ckpt_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()

    paths = find_images(cfg.inputs)
    done: list[str] = []
    probs: list[torch.Tensor] = []
    unreadable: dict[str, str] = {}
    for start in range(0, len(paths), CHUNK):
        chunk = paths[start : start + CHUNK]
        images, bad = load_images(chunk, saved.data.image_size, name="inputs")
        unreadable |= bad
        keep = [i for i, path in enumerate(chunk) if path not in bad]
        done += [chunk[i] for i in keep]
        with torch.inference_mode():
            for batch in images[keep].split(cfg.batch_size) if keep else ():
                probs.append(model(batch.to(device)).float().softmax(1).cpu())

    out.mkdir(parents=True, exist_ok=True)
    classes = model.classes
    table = torch.cat(probs).numpy() if probs else np.empty((0, len(classes)))
    write_predictions(out / "predictions.csv", done, table, classes)
    log.info("Predictions for %d image(s): %s", len(done), out / "predictions.csv")
    if unreadable:
        with (out / "unreadable.csv").open("w", newline="") as f:
            csv.writer(f).writerows([("path", "reason"), *sorted(unreadable.items())])
        listing = "\n".join(f"  {path}: {why}" for path, why in sorted(unreadable.items()))
        log.warning("%d file(s) could not be read (unreadable.csv):\n%s", len(unreadable), listing)


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    predict(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
