"""What each data setting accepts: one table, checked when a datamodule is built, so a wrong
type or range fails at once with one line naming the setting, not deep inside training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cellcls.core.errors import is_number, is_whole
from cellcls.data.splits import HOLDOUT

CACHE_MODES = ("disk", "memory", None)
# How validation images are held out of TRAIN: whole source cells, or images at random.
VAL_SPLITS = ("grouped", "random")


def _names(classes: Any) -> bool:
    names = not isinstance(classes, str) and all(isinstance(c, str) for c in classes)
    return names and len(set(classes)) == len(classes) >= 2


def _bool(value: Any) -> bool:
    return isinstance(value, bool)


# What each data setting accepts, as its one-line error says it: (setting, rule, accepted). A rule
# reads all the settings, so a setting that depends on another says so in its own row.
SETTINGS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("classes", lambda h: _names(h.classes), "a list of at least two distinct class-folder names"),
    ("image_size", lambda h: is_whole(h.image_size, 1), "an integer >= 1"),
    (
        "crop",
        lambda h: h.crop is None or is_whole(h.crop, 8),
        "null (whole image) or the side in pixels of the square cut around the white cell",
    ),
    ("val_split", lambda h: h.val_split in VAL_SPLITS, "grouped or random"),
    (
        "folds",
        lambda h: h.folds is None or is_whole(h.folds, 2),
        "null (one grouped split) or the number of cross-validation folds, >= 2",
    ),
    (
        "fold",
        lambda h: h.folds is None or (is_whole(h.fold, 0) and h.fold < h.folds),
        "an integer from 0 to data.folds - 1",
    ),
    (
        "folds",
        lambda h: h.folds is None or h.val_split == "grouped",
        "null with data.val_split=random: folds hold out whole source cells",
    ),
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
        "on_device",
        lambda h: h.on_device is not True or h.cache is not None,
        "auto or false without the decoded-image store (data.cache=null)",
    ),
]
