"""What each data setting accepts: one table, checked when a datamodule is built, so a wrong
type or range fails at once with one line naming the setting, not deep inside training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cellcls.core.errors import is_number, is_whole
from cellcls.data.grouping import is_groups_setting
from cellcls.data.splits import DRAWN, HOLDOUT

CACHE_MODES = ("disk", "memory", None)
# How validation images are held out of TRAIN: whole source cells, or images at random.
VAL_SPLITS = ("grouped", "random")


def _names(classes: Any) -> bool:
    names = not isinstance(classes, str) and all(isinstance(c, str) for c in classes)
    return names and len(set(classes)) == len(classes) >= 2


def _bool(value: Any) -> bool:
    return isinstance(value, bool)


def _stats(value: Any) -> bool:
    """`auto`, or three numbers (one per RGB channel)."""
    if value == "auto":
        return True
    return not isinstance(value, str) and len(value) == 3 and all(is_number(v) for v in value)


def _crop(value: Any) -> bool:
    """null, a side in pixels (an integer >= 8), or a fraction of the shorter side (0, 1]."""
    if value is None or is_whole(value, 8):
        return True
    return isinstance(value, float) and 0 < value <= 1


# What each data setting accepts, as its one-line error says it: (setting, rule, accepted). A rule
# reads all the settings, so a setting that depends on another says so in its own row.
SETTINGS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("classes", lambda h: _names(h.classes), "a list of at least two distinct class-folder names"),
    ("image_size", lambda h: is_whole(h.image_size, 1), "an integer >= 1"),
    (
        "crop",
        lambda h: _crop(h.crop),
        "null (whole image), or the side of the square cut around the white cell: a fraction of "
        "the image's shorter side (0 to 1, e.g. 0.5) or pixels (an integer >= 8)",
    ),
    (
        "groups",
        lambda h: is_groups_setting(h.groups),
        "auto (match augmented copies), none (each image its own group) or a CSV path,group file",
    ),
    (
        "test_fraction",
        lambda h: is_number(h.test_fraction) and 0 < h.test_fraction < 1,
        "a number between 0 and 1 (the share of each class drawn as the test part), e.g. 0.2",
    ),
    ("val_split", lambda h: h.val_split in VAL_SPLITS, "grouped or random"),
    (
        "folds",
        lambda h: h.folds is None or is_whole(h.folds, 2),
        "null (one grouped split) or the number of cross-validation folds, >= 2",
    ),
    (
        "fold",
        lambda h: h.folds is None or h.fold is None or (is_whole(h.fold, 0) and h.fold < h.folds),
        "an integer from 0 to data.folds - 1 (null: every fold, with python -m cellcls.cv)",
    ),
    (
        "folds",
        lambda h: h.folds is None or h.val_split == "grouped",
        "null with data.val_split=random: folds hold out whole source cells",
    ),
    (
        "split",
        lambda h: h.train_split is not None or h.split in (DRAWN, HOLDOUT),
        f"{DRAWN} (the part drawn for testing) or {HOLDOUT} without a train folder "
        "(data.train_split=null: data.root holds the class folders)",
    ),
    ("mean", lambda h: _stats(h.mean), "auto (measured on the training images) or 3 numbers"),
    ("std", lambda h: _stats(h.std), "auto (measured on the training images) or 3 numbers"),
    ("batch_size", lambda h: is_whole(h.batch_size, 1), "an integer >= 1"),
    (
        "val_fraction",
        lambda h: is_number(h.val_fraction) and 0 <= h.val_fraction < 1,
        "a number from 0 (train on all of TRAIN, no validation) to 1 (exclusive), e.g. 0.2",
    ),
    (
        "split",
        lambda h: h.val_fraction > 0 or h.folds or h.split != HOLDOUT,
        "a folder such as TEST: with data.val_fraction=0 no validation images are held out",
    ),
    (
        "num_workers",
        lambda h: h.num_workers is None or is_whole(h.num_workers, 0),
        "null (automatic) or an integer >= 0",
    ),
    ("cache", lambda h: h.cache in CACHE_MODES, "disk, memory or null"),
    (
        "cache_dir",
        lambda h: h.cache != "disk" or bool(h.cache_dir),
        "a folder for the store when data.cache=disk",
    ),
    ("skip_bad_images", lambda h: _bool(h.skip_bad_images), "true or false"),
    ("download", lambda h: _bool(h.download), "true or false"),
    ("on_device", lambda h: h.on_device in (True, False, "auto"), "auto, true or false"),
    (
        "ignore_classes",
        lambda h: (
            not isinstance(h.ignore_classes, str)
            and all(isinstance(c, str) and c not in h.classes for c in h.ignore_classes)
        ),
        "a list of class-folder names that are not in data.classes",
    ),
    (
        "on_device",
        lambda h: h.on_device is not True or h.cache is not None,
        "auto or false without the decoded-image store (data.cache=null)",
    ),
]
