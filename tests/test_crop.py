"""White-cell crops: found where the generator planted the cell, stored, previewed, restored."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellcls.core.errors import CellclsError
from cellcls.data.crop import find_cell, square_box
from cellcls.data.generate import generate_dataset, read_sources
from cellcls.run.checkpoint import restore
from cellcls.train import train
from tests.conftest import FAST, best_checkpoint, compose_run, make_dm


@pytest.fixture(scope="module")
def cells_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 TRAIN and 4 TEST images per class, 3 augmented copies per source cell."""
    root = tmp_path_factory.mktemp("cells") / "data"
    return generate_dataset(root, 12, 4, seed=7, copies=3, progress=False)


def test_crop_finds_the_planted_white_cell(cells_root: Path) -> None:
    rows = read_sources(cells_root)
    misses = []
    for row in rows:
        with Image.open(cells_root / row["path"]) as im:
            found = find_cell(np.asarray(im.convert("RGB")))
        x, y, r = (float(row[k]) for k in ("wbc_x", "wbc_y", "wbc_r"))
        if found is None or math.dist(found, (x, y)) > r / 2:
            misses.append((row["path"], found, (x, y)))
    assert len(misses) <= 0.03 * len(rows), misses


def test_no_stain_is_none_and_the_box_stays_inside() -> None:
    grey = np.full((240, 320, 3), 200, np.uint8)
    grey[:40] = 0  # a black augmentation border is not a cell
    assert find_cell(grey) is None
    assert square_box(None, 100, 320, 240) == (110, 70, 210, 170)  # centre crop
    assert square_box((5.0, 230.0), 100, 320, 240) == (0, 140, 100, 240)  # moved inside
    assert square_box((160.0, 120.0), 500, 320, 240) == (40, 0, 280, 240)  # cut to the image


def test_crop_is_part_of_the_store_and_cells_not_found_are_listed(
    cells_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    generate_dataset(root, 6, 2, seed=7, progress=False)
    blank = root / "TRAIN" / "EOSINOPHIL" / "blank.jpeg"
    Image.new("RGB", (320, 240), (220, 215, 210)).save(blank)
    dm = make_dm(root, crop=80, cache="disk", cache_dir=tmp_path / "store", val_split="random")
    dm.prepare_data()
    dm.setup("fit")
    assert dm.centred == {"TRAIN": [str(blank)]}
    x, _ = dm.train_set[0]
    assert x.shape == (3, 32, 32)
    stores = sorted(p.name for p in (tmp_path / "store").glob("TRAIN-*.npy"))
    assert len(stores) == 1 and "-32px-crop80-" in stores[0]
    whole = make_dm(root, cache="disk", cache_dir=tmp_path / "store", val_split="random")
    whole.prepare_data()  # the whole image is another store
    assert len(list((tmp_path / "store").glob("TRAIN-*.npy"))) == 2
    with pytest.raises(CellclsError, match="data.crop"):
        make_dm(root, crop="wbc")


@pytest.mark.slow
def test_training_with_a_crop_previews_it_and_the_checkpoint_keeps_it(in_tmp: Path) -> None:
    args = [*FAST, "data.n_train=12", "data.n_test=4", "data.crop=100", "trainer.max_epochs=1"]
    run = in_tmp / "run"
    train(compose_run(args, run))
    assert (run / "crops.png").stat().st_size > 0
    assert (run / "centred.txt").read_text() == ""  # every generated cell was found
    assert restore(best_checkpoint(run), data=False).config.data.crop == 100  # eval, predict
