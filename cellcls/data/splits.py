"""Splits of a training folder into train and validation parts: whole source groups, or images
at random (the tutorial's protocol, which leaks copies of a cell across the split)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import random_split

# `data.split` value that tests on the seeded validation part of TRAIN (the tutorial's protocol).
HOLDOUT = "val"
# `data.split` value that tests on the seeded part drawn, in whole groups, from a dataset given
# as one folder of class folders (no test folder: PBC, LISC, a lab's own smears).
DRAWN = "test"


def too_few_groups(
    groups: Sequence[int], labels: Sequence[int], classes: Sequence[str], need: int
) -> str | None:
    """The first class with fewer than `need` groups, in words with its numbers, or None."""
    groups, labels = np.asarray(groups), np.asarray(labels)
    for c, name in enumerate(classes):
        mine = labels == c
        n = len(np.unique(groups[mine]))
        if n < need:
            return f"class {name} has {n} source group(s) ({int(mine.sum())} images)"
    return None


def grouped_split(
    groups: Sequence[int],
    labels: Sequence[int],
    val_fraction: float,
    seed: int,
) -> tuple[list[int], list[int]]:
    """Train and validation indices that never share a group: about `val_fraction` of each
    class's images, in whole groups drawn in a seeded order.

    A group counts for the class most of its images carry (a mislabelled copy goes with its
    cell). Every class with two groups or more gets at least one in validation and keeps at
    least one for training; a class with a single group has none in validation.
    """
    groups, labels = np.asarray(groups), np.asarray(labels)
    rng = np.random.default_rng(seed)
    ids, inverse = np.unique(groups, return_inverse=True)
    size = np.bincount(inverse)
    majority = np.array([np.bincount(labels[inverse == k]).argmax() for k in range(len(ids))])
    val_groups: list[int] = []
    for c in np.unique(majority):
        mine = rng.permutation(np.flatnonzero(majority == c))
        target, taken = val_fraction * size[mine].sum(), 0
        for n, k in enumerate(mine[:-1]):  # the last one always trains
            if n == 0 or abs(taken + size[k] - target) < abs(taken - target):
                val_groups.append(ids[k])
                taken += size[k]
    in_val = np.isin(groups, val_groups)
    return np.flatnonzero(~in_val).tolist(), np.flatnonzero(in_val).tolist()


def fold_indices(
    groups: Sequence[int], labels: Sequence[int], folds: int, fold: int, seed: int
) -> tuple[list[int], list[int]]:
    """Train and validation indices of fold `fold` of `folds`: whole groups, each validated in
    exactly one fold, classes as balanced over folds as the groups allow, in a seeded order
    (scikit-learn's `StratifiedGroupKFold`, the well-kept reference)."""
    from sklearn.model_selection import StratifiedGroupKFold  # only for cross-validation

    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    train, val = list(splitter.split(np.zeros(len(labels)), labels, groups))[fold]
    return train.tolist(), val.tolist()


def random_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and validation indices of a seeded random split of `n` images (`val_split=random`,
    the tutorial's protocol)."""
    generator = torch.Generator().manual_seed(seed)
    train, val = random_split(range(n), [1 - val_fraction, val_fraction], generator=generator)
    return list(train.indices), list(val.indices)


def shared_groups(groups: Sequence[int], a: Sequence[int], b: Sequence[int]) -> int:
    """How many images of index set `b` share a group with some image of index set `a`."""
    groups = np.asarray(groups)
    return int(np.isin(groups[list(b)], groups[list(a)]).sum())
