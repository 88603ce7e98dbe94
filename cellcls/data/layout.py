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


def subfolders(folder: Path) -> list[str]:
    """The names of `folder`'s visible subfolders, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_folders(root: str | Path, train_split: str | None = None) -> list[str]:
    """The class names of a dataset, discovered: the folders of `root/<train_split>` (or of
    `root` itself when no split is given), sorted. For `data.classes: null` (the
    `${class_folders:...}` resolver in conf/data/imagefolder.yaml)."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise CellclsError(
            f"data.root '{folder}' does not exist: point data.root (or CELLCLS_DATA) at your "
            "dataset, <root>/<class>/<images> or <root>/<split>/<class>/<images> (with "
            "data.train_split), or give data.classes."
        )
    if train_split:
        folder = find_split_root(folder, [train_split]) / train_split
    names = subfolders(folder)
    with_images = [c for c in names if has_images(folder / c)]
    if not with_images and names and all(subfolders(folder / c) for c in names):
        raise CellclsError(
            f"data.root '{folder}' holds split folders ({', '.join(names)}), not class folders: "
            f"name them, e.g. data.train_split={names[-1]} data.split={names[0]}."
        )
    if len(with_images) < 2:
        raise CellclsError(
            f"data.root '{folder}' holds {len(with_images)} class folder(s) with images "
            f"({', '.join(with_images) or 'none'}); a classifier needs at least two "
            "(<root>/<class>/<images>, or <root>/<split>/<class>/<images> with data.train_split)."
        )
    return with_images


def has_images(folder: Path) -> bool:
    """Whether `folder` holds at least one image file (by extension)."""
    return any(f.suffix.lower() in IMG_EXTENSIONS for f in folder.iterdir())


def check_classes(
    split_dir: Path,
    classes: Sequence[str],
    allow_missing: bool = False,
    ignored: Sequence[str] = (),
) -> None:
    """Fail unless `split_dir` has exactly one non-empty folder per class in `classes` (folders
    named in `ignored` aside); with `allow_missing` (a test folder), absent classes are logged
    instead: there is nothing of them to score (Raabin-WBC's TestB holds two of its five)."""
    found = [f for f in subfolders(split_dir) if f not in ignored]
    missing = [c for c in classes if c not in found or not has_images(split_dir / c)]
    unexpected = [c for c in found if c not in classes]
    if missing and allow_missing and not unexpected and len(missing) < len(classes):
        log.warning(
            "'%s' holds no images of %s: the report scores the other classes only.",
            split_dir,
            ", ".join(missing),
        )
        return
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {missing}")
        if unexpected:
            problems.append(f"unexpected {unexpected}")
        empty = [c for c in missing if c in found]
        if empty and not unexpected and len(empty) == len(missing):
            raise CellclsError(
                f"class folder '{split_dir / empty[0]}' holds no images "
                f"({', '.join(IMG_EXTENSIONS)}). Add images or remove the class from data.classes."
            )
        raise CellclsError(
            f"class folders in '{split_dir}' do not match data.classes={list(classes)}: "
            f"{'; '.join(problems)}. Rename or remove the folders, or set data.classes."
        )


def warn_not_images(split_dir: Path, classes: Sequence[str]) -> None:
    """One warning that counts the files in the class folders that are not images by extension.

    They are ignored, as ImageFolder does; the warning says so, instead of silence.
    """
    others = [
        f
        for c in classes
        if (split_dir / c).is_dir()
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

    def __init__(
        self, root: Path, classes: Sequence[str], loader: Any, allow_empty: bool = False
    ) -> None:
        self._classes = list(classes)
        super().__init__(str(root), loader=loader, allow_empty=allow_empty)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return self._classes, {c: i for i, c in enumerate(self._classes)}


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
