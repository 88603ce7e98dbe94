"""Which images come from the same source (a cell, a slide, a patient): `data.groups`.

Splits, folds and intervals keep a group together. `auto` matches augmented copies of one cell
by their keypoints (`cellcls.data.matching`, for sets like Kaggle's); `none` makes each image
its own group (for sets without copies); a CSV file `path,group` gives the user's own IDs
(patients, slides), paths relative to `data.root` or absolute.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cellcls.core.errors import CellclsError
from cellcls.data.matching import load_groups

MODES = ("auto", "none")


def is_groups_setting(value: object) -> bool:
    """`auto`, `none`, or a path ending in .csv."""
    return isinstance(value, str) and (value in MODES or value.lower().endswith(".csv"))


def source_groups(
    paths: Sequence[str],
    mode: str,
    root: Path,
    cache_dir: str | Path | None,
    name: str,
    write: bool = False,
) -> np.ndarray:
    """An integer group per image of `paths`, as `mode` (`data.groups`) says."""
    if mode == "none":
        return np.arange(len(paths))
    if mode == "auto":
        return load_groups(paths, cache_dir, name, write=write)
    return read_user_groups(Path(mode).expanduser(), paths, root)


def read_user_groups(file: Path, paths: Sequence[str], root: Path) -> np.ndarray:
    """The groups a CSV (`path,group`) gives `paths`; every image must be listed."""
    if not file.is_file():
        raise CellclsError(f"data.groups='{file}' does not exist (a CSV with path,group rows).")
    with file.open(newline="") as f:
        reader = csv.DictReader(f)
        if not {"path", "group"} <= set(reader.fieldnames or ()):
            raise CellclsError(
                f"data.groups='{file}' has columns {reader.fieldnames}; it needs path and group."
            )
        given = {_key(row["path"], root, relative_to_root=True): row["group"] for row in reader}
    keys = [_key(p, root) for p in paths]
    unlisted = [p for p, k in zip(paths, keys, strict=True) if k not in given]
    if unlisted:
        raise CellclsError(
            f"data.groups='{file}' lists no group for {len(unlisted)} of {len(paths)} images, "
            f"e.g. '{unlisted[0]}' (paths relative to data.root '{root}', or absolute)."
        )
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(given[k], len(ids)) for k in keys])


def _key(path: str, root: Path, relative_to_root: bool = False) -> str:
    """One spelling of a path: relative to `root` when under it, else absolute. A relative
    path in the CSV is relative to `root`; an image's is relative to the working folder."""
    p = Path(path).expanduser()
    if relative_to_root and not p.is_absolute():
        p = root.expanduser() / p
    p = p.resolve()
    try:
        return p.relative_to(root.expanduser().resolve()).as_posix()
    except ValueError:
        return p.as_posix()
