"""Images that are not white-cell crops, as the network sees them, to measure an OOD flag.

Each function returns (N x size x size x 3 uint8 images, N group ids): the same preprocessing
as training (`cellcls.data.decode.cut_cell`), and one group per independent source (a slide, a
generated field, a noise image), so their figures carry intervals over sources.

- `red_cell_fields`: windows of Kaggle's original 640x480 slides (`dataset-master/JPEGImages`)
  that hold red cells and no white cell (no nucleus stain, `cellcls.data.crop.find_cell`), of
  the side the model's white-cell crop has on a slide of that size;
- `synthetic_cells`: fields drawn by `cellcls.data.generate` (cartoon cells: unlike a smear);
- `noise`: uniform random pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cellcls.core.errors import CellclsError
from cellcls.core.images import open_image
from cellcls.data.crop import find_cell
from cellcls.data.decode import crop_side, cut_cell, to_rgb8
from cellcls.data.generate import CLASSES, render_cell

SLIDES = "dataset-master/dataset-master/JPEGImages"  # under the Kaggle download's root
TRIES = 40  # random windows tried per slide before it is given up


def red_cell_fields(
    root: str | Path, size: int, crop: float | None, per_slide: int = 2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Up to `per_slide` stain-free windows of each slide under `root`/`SLIDES`."""
    folder = Path(root).expanduser() / SLIDES
    files = sorted(folder.glob("*.jp*g"))
    if not files:
        raise CellclsError(
            f"no slides in '{folder}': ood.red_cells needs Kaggle's dataset-master (the 640x480 "
            "originals), or ood.red_cells=false."
        )
    rng = np.random.default_rng(seed)
    images, groups = [], []
    for g, file in enumerate(files):
        with open_image(file) as im:
            rgb = np.asarray(to_rgb8(im))
        h, w = rgb.shape[:2]
        side = crop_side(crop, (w, h)) if crop is not None else min(w, h) // 2
        found = 0
        for _ in range(TRIES):
            x, y = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
            window = rgb[y : y + side, x : x + side]
            if find_cell(window) is None:  # no nucleus in it: red cells (and maybe platelets)
                images.append(cut_cell(Image.fromarray(window), size).image)
                groups.append(g)
                found += 1
                if found == per_slide:
                    break
    return np.stack(images), np.array(groups)


def synthetic_cells(
    n: int, size: int, crop: float | None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`n` generated fields, cut as training cuts its images."""
    rng = np.random.default_rng(seed)
    images = [
        cut_cell(render_cell(CLASSES[i % len(CLASSES)], rng)[0], size, crop).image for i in range(n)
    ]
    return np.stack(images), np.arange(n)


def noise(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` images of uniform random pixels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.arange(n)
