"""The datamodule's splits, tensors and class order, and its messages for bad layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cellcls.core.errors import CellclsError
from tests.conftest import CLASSES, CONF_DIR, make_dm


def test_splits_shapes_dtype_range(tiny_root: Path) -> None:
    dm = make_dm(tiny_root, val_fraction=0.25, val_split="random")
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (18, 6, 8)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8  # 4x smaller to move around
    assert x.max() > 128  # full 0-255 range; the model scales to [0, 1] on the device
    assert y.dtype == torch.int64 and set(y.tolist()) <= set(range(4))


def test_docs_say_what_the_datamodule_yields() -> None:
    docs = (CONF_DIR.parent / "docs" / "configuration.md").read_text()
    assert "The datamodule yields uint8 images (0-255)" in docs  # as the test above checks
    assert "yields images in [0, 1]" not in docs


def test_split_is_seeded_and_disjoint(tiny_root: Path) -> None:
    a, b, c = (make_dm(tiny_root, seed=s, val_split="random") for s in (1, 1, 2))
    for dm in (a, b, c):
        dm.setup("fit")
    assert a.val_set.indices == b.val_set.indices != c.val_set.indices
    assert not set(a.train_set.indices) & set(a.val_set.indices)


def test_class_order_comes_from_config(tiny_root: Path) -> None:
    order = list(reversed(CLASSES))
    dm = make_dm(tiny_root, classes=order)
    dm.setup()
    for ds in (dm.train_set.dataset, dm.test_set):
        assert ds.classes == order
        for path, label in ds.samples:
            assert Path(path).parent.name == order[label]


def test_finds_kaggle_download_layout(tiny_root: Path, tmp_path: Path) -> None:
    nested = tmp_path / "blood-cells" / "dataset2-master" / "dataset2-master" / "images"
    shutil.copytree(tiny_root, nested)
    dm = make_dm(tmp_path / "blood-cells")
    dm.setup("test")
    assert dm.split_root == nested
    assert all(Path(p).is_relative_to(nested / "TEST") for p in dm.test_paths)


@pytest.fixture
def broken(tiny_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "broken"
    shutil.copytree(tiny_root, root)
    return root


def setup_error(root: Path, **kw) -> str:
    with pytest.raises(CellclsError) as err:
        make_dm(root, **kw).setup()
    return str(err.value)


def test_missing_root_says_where_to_get_data(tmp_path: Path) -> None:
    msg = setup_error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in msg
    assert "kaggle.com" in msg and "data=synthetic" in msg


def test_root_without_splits(tmp_path: Path) -> None:
    (tmp_path / "something").mkdir()
    msg = setup_error(tmp_path)
    assert str(tmp_path) in msg and "TRAIN/" in msg and "TEST/" in msg


def test_missing_class_folder(broken: Path) -> None:
    shutil.rmtree(broken / "TRAIN" / "MONOCYTE")  # a test folder may lack one: test_imagefolder
    msg = setup_error(broken)
    assert str(broken / "TRAIN") in msg and "missing ['MONOCYTE']" in msg


def test_unexpected_class_folder(broken: Path) -> None:
    (broken / "TRAIN" / "BASOPHIL").mkdir()
    msg = setup_error(broken)
    assert str(broken / "TRAIN") in msg and "unexpected ['BASOPHIL']" in msg


def test_empty_class_folder(broken: Path) -> None:
    for f in (broken / "TRAIN" / "LYMPHOCYTE").iterdir():
        f.unlink()
    msg = setup_error(broken)
    assert str(broken / "TRAIN" / "LYMPHOCYTE") in msg and "no images" in msg


@pytest.mark.parametrize("fraction", [-0.1, 1, 1.5])
def test_bad_val_fraction(tiny_root: Path, fraction: float) -> None:
    assert "data.val_fraction" in setup_error(tiny_root, val_fraction=fraction)


def test_val_fraction_zero_trains_on_all_of_train(tiny_root: Path) -> None:
    dm = make_dm(tiny_root, val_fraction=0)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (24, 0, 8)
    assert "data.split" in setup_error(tiny_root, val_fraction=0, split="val")  # nothing held out


def test_split_val_tests_on_the_holdout(tiny_root: Path) -> None:
    dm = make_dm(tiny_root, split="val", val_fraction=0.25, val_split="random")
    dm.setup()
    assert dm.test_set is dm.val_set
    samples = dm.val_set.dataset.samples
    assert dm.test_paths == [samples[i][0] for i in dm.val_set.indices]


def test_test_stage_needs_only_its_split(tiny_root: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_root / "TEST", tmp_path / "OTHER")
    dm = make_dm(tmp_path, split="OTHER")
    dm.setup("test")
    assert len(dm.test_set) == 8 and dm.train_set is None
    assert all(Path(p).parts[-3] == "OTHER" for p in dm.test_paths)
    assert "TRAIN/" in setup_error(tmp_path, split="OTHER")  # fitting still needs TRAIN


def test_prepare_data_writes_and_setup_reads(tiny_root: Path, tmp_path: Path) -> None:
    """Lightning's contract: prepare_data writes files and sets no state; setup reads them,
    and without them (no prepare_data) decodes and groups in memory, writing nothing."""
    store = tmp_path / "store"
    dm = make_dm(tiny_root, cache="disk", cache_dir=store)
    dm.prepare_data()
    assert dm.train_set is None and dm.test_set is None
    written = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    assert any(n.startswith("TRAIN-") and n.endswith(".npy") for n in written)
    assert any(n.startswith("TEST-") and n.endswith(".npy") for n in written)
    assert any(n.startswith("groups-") for n in written)
    dm.setup("fit")
    dm.setup("test")
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == written  # read only
    fresh = tmp_path / "fresh"
    alone = make_dm(tiny_root, cache="disk", cache_dir=fresh)
    alone.setup("fit")
    assert not fresh.exists() and len(alone.train_set) == len(dm.train_set)
    assert alone.train_set.indices == dm.train_set.indices
