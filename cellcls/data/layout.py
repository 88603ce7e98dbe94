"""Find the split folders of a dataset and check them before any training starts."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from cellcls.core.errors import CellclsError

log = logging.getLogger(__name__)

KAGGLE_URL = "https://www.kaggle.com/datasets/paultimothymooney/blood-cells"
# Where the split folders sit inside Kaggle's download, relative to what the user points at.
KAGGLE_SUBDIRS = ("images", "dataset2-master/images", "dataset2-master/dataset2-master/images")


def find_split_root(root: str | Path, splits: Sequence[str]) -> Path:
    """Return the folder holding all `splits`: `root` itself or Kaggle's nested layout under it."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CellclsError(
            f"data.root '{root}' does not exist. Pass data.download=true to download the Kaggle "
            f"'Blood Cell Images' dataset ({KAGGLE_URL}) there, or point data.root (or "
            "CELLCLS_DATA) at your copy; or run on generated images with data=synthetic."
        )
    for candidate in (root, *(root / sub for sub in KAGGLE_SUBDIRS)):
        if all((candidate / split).is_dir() for split in splits):
            return candidate
    raise CellclsError(
        f"data.root '{root}' holds no {'/ and '.join(splits)}/ folders (looked in it and in "
        f"{', '.join(KAGGLE_SUBDIRS)} under it). Point data.root at the folder that contains "
        f"{' and '.join(s + '/' for s in splits)}, or at the unpacked Kaggle download."
    )


def check_classes(split_dir: Path, classes: Sequence[str]) -> None:
    """Fail unless `split_dir` has exactly one non-empty folder per class in `classes`."""
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    missing = [c for c in classes if c not in found]
    unexpected = [c for c in found if c not in classes]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {missing}")
        if unexpected:
            problems.append(f"unexpected {unexpected}")
        raise CellclsError(
            f"class folders in '{split_dir}' do not match data.classes={list(classes)}: "
            f"{'; '.join(problems)}. Rename or remove the folders, or set data.classes."
        )
    for c in classes:
        if not any(f.suffix.lower() in IMG_EXTENSIONS for f in (split_dir / c).iterdir()):
            raise CellclsError(
                f"class folder '{split_dir / c}' holds no images ({', '.join(IMG_EXTENSIONS)}). "
                "Add images or remove the class from data.classes."
            )


def warn_not_images(split_dir: Path, classes: Sequence[str]) -> None:
    """One warning that counts the files in the class folders that are not images by extension.

    They are ignored, as ImageFolder does; the warning says so, instead of silence.
    """
    others = [
        f
        for c in classes
        for f in (split_dir / c).iterdir()
        if f.is_file() and f.suffix.lower() not in IMG_EXTENSIONS
    ]
    if others:
        kinds = Counter(f.suffix.lower() or f.name for f in others)
        log.warning(
            "Ignoring %d file(s) in '%s' that are not images by their extension (%s).",
            len(others),
            split_dir,
            ", ".join(f"{k}: {n}" for k, n in kinds.most_common()),
        )


class ClassFolder(ImageFolder):
    """ImageFolder whose class list and order come from the caller, not from sorting folders."""

    def __init__(self, root: Path, classes: Sequence[str], loader: Any) -> None:
        self._classes = list(classes)
        super().__init__(str(root), loader=loader)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return self._classes, {c: i for i, c in enumerate(self._classes)}
