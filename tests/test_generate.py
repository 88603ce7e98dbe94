"""The generator: Kaggle layout, 320x240 JPEGs, deterministic, never half-written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cellcls.data.generate import CLASSES, generate_dataset


def test_layout_counts_and_size(tiny_root: Path) -> None:
    for split, n in (("TRAIN", 6), ("TEST", 2)):
        assert sorted(p.name for p in (tiny_root / split).iterdir()) == list(CLASSES)
        for c in CLASSES:
            files = sorted((tiny_root / split / c).glob("*.jpeg"))
            assert len(files) == n
            with Image.open(files[0]) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (320, 240))
    assert not list(tiny_root.parent.glob(".*tmp*")), "temporary folder left behind"


def test_deterministic_and_independent_of_counts(tiny_root: Path, tmp_path: Path) -> None:
    other = generate_dataset(tmp_path / "again", 3, 1, progress=False)
    for f in other.rglob("*.jpeg"):
        assert f.read_bytes() == (tiny_root / f.relative_to(other)).read_bytes()


def test_seed_changes_images_and_splits_differ(tiny_root: Path, tmp_path: Path) -> None:
    other = generate_dataset(tmp_path / "seed1", 1, 1, seed=1, progress=False)
    name = next((other / "TRAIN" / "MONOCYTE").iterdir()).name
    pixels = [np.asarray(Image.open(r / "TRAIN" / "MONOCYTE" / name)) for r in (tiny_root, other)]
    assert not np.array_equal(*pixels)
    train0 = np.asarray(Image.open(tiny_root / "TRAIN" / "MONOCYTE" / name))
    test0 = np.asarray(Image.open(tiny_root / "TEST" / "MONOCYTE" / name))
    assert not np.array_equal(train0, test0)
