"""Source-cell groups: recovered from generated copies, held out whole, cached, and reported."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from cellcls.data import matching
from cellcls.data.generate import generate_dataset, read_sources
from cellcls.data.matching import find_groups, load_groups
from cellcls.data.splits import grouped_split, shared_groups
from cellcls.groups import report
from tests.conftest import CONF_DIR, FAST, compose_run, make_dm, split_groups


@pytest.fixture(scope="module")
def copies_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 TRAIN and 8 TEST images per class: 6 and 2 source cells of 4 copies each."""
    root = tmp_path_factory.mktemp("copies") / "data"
    return generate_dataset(root, 24, 8, seed=3, copies=4, progress=False)


def pairwise(truth: np.ndarray, found: np.ndarray) -> tuple[float, float]:
    """Precision and recall of 'same group' over all pairs of images."""
    upper = np.triu_indices(len(truth), 1)
    same_truth = (truth[:, None] == truth[None, :])[upper]
    same_found = (found[:, None] == found[None, :])[upper]
    hits = (same_truth & same_found).sum()
    return hits / max(same_found.sum(), 1), hits / max(same_truth.sum(), 1)


def test_grouping_recovers_the_generated_sources(copies_root: Path) -> None:
    rows = read_sources(copies_root)
    paths = [str(copies_root / r["path"]) for r in rows]
    truth = np.unique([r["source"] for r in rows], return_inverse=True)[1]
    found = find_groups(paths, progress=False)
    precision, recall = pairwise(truth, found)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert len(truth) == 4 * (24 + 8) and truth.max() + 1 == 4 * (6 + 2)


def test_mirrored_copy_is_found(tmp_path: Path) -> None:
    """ORB is not mirror-invariant: a flipped copy must still join its source."""
    from cellcls.data.generate import render_cell

    image, _ = render_cell("MONOCYTE", np.random.default_rng(7))
    other, _ = render_cell("MONOCYTE", np.random.default_rng(8))
    mirror = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for name, im in {"a": image, "mirror": mirror, "other": other}.items():
        im.save(tmp_path / f"{name}.png")
    labels = find_groups([str(tmp_path / f"{n}.png") for n in ("a", "mirror", "other")], False)
    assert labels[0] == labels[1] != labels[2]


def test_grouped_split_is_seeded_stratified_and_whole() -> None:
    groups = np.repeat(np.arange(40), 5)  # 40 groups of 5 images, 10 groups per class
    labels = np.repeat(np.arange(4), 50)
    train, val = grouped_split(groups, labels, 0.2, seed=1)
    assert sorted(train + val) == list(range(200))
    assert not set(groups[train]) & set(groups[val])
    assert np.bincount(labels[val], minlength=4).tolist() == [10, 10, 10, 10]
    assert grouped_split(groups, labels, 0.2, seed=1) == (train, val)
    assert grouped_split(groups, labels, 0.2, seed=2) != (train, val)


def test_a_class_with_one_group_still_trains() -> None:
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    train, val = grouped_split(groups, labels, 0.5, seed=0)
    assert set(labels[train]) == {0, 1} and set(labels[val]) == {0, 1}
    single = grouped_split(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]), 0.5, seed=0)
    assert single == ([0, 1, 2, 3], [])


def test_datamodule_holds_out_whole_groups(copies_root: Path, tmp_path: Path) -> None:
    dm = make_dm(copies_root, val_split="grouped", cache_dir=tmp_path, seed=5)
    dm.prepare_data()
    dm.setup("fit")
    train, val = split_groups(dm)
    assert val and not train & val
    samples = dm.train_set.dataset.samples
    assert 0.1 < len(dm.val_set) / len(samples) < 0.45
    # every class is validated on
    assert {samples[i][1] for i in dm.val_set.indices} == set(range(4))
    # the groups were cached beside the decoded-image stores, keyed by the files
    (cached,) = tmp_path.glob("groups-*-TRAIN-*.csv")
    assert len(list(csv.DictReader(cached.open()))) == len(samples)


def test_random_split_is_todays_split(copies_root: Path) -> None:
    dm = make_dm(copies_root, val_split="random", seed=9, val_fraction=0.3)
    dm.setup("fit")
    generator = torch.Generator().manual_seed(9)
    train, val = torch.utils.data.random_split(dm.train_set.dataset, [0.7, 0.3], generator)
    assert dm.train_set.indices == train.indices and dm.val_set.indices == val.indices


def test_bad_val_split_setting(copies_root: Path) -> None:
    from cellcls.core.errors import CellclsError

    with pytest.raises(CellclsError, match="data.val_split='leave-one-out' is not accepted"):
        make_dm(copies_root, val_split="leave-one-out")


def test_cached_groups_are_reused(copies_root: Path, tmp_path: Path, monkeypatch) -> None:
    paths = sorted(str(p) for p in (copies_root / "TEST").rglob("*.jpeg"))
    first = load_groups(paths, tmp_path, name="TEST", progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(matching, "find_groups", fail)
    assert load_groups(paths, tmp_path, name="TEST", progress=False).tolist() == first.tolist()


@pytest.mark.slow
def test_groups_app_writes_csv_plot_and_leaks(in_tmp: Path, caplog) -> None:
    overrides = [*FAST[:3], "data.n_train=16", "data.n_test=4", "data.copies=4"]
    out = in_tmp / "out"
    cfg = compose_run(overrides, out, "groups")
    with caplog.at_level(logging.INFO):
        report(cfg, out)
    with (out / "groups.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "group"] and len(rows) == 1 + 4 * 16
    paths = [r[0] for r in rows[1:]]
    assert all(Path(p).is_file() and Path(p).parts[-3] == "TRAIN" for p in paths)
    assert all(r[1].isdigit() for r in rows[1:])
    summary = json.loads((out / "groups.json").read_text())
    assert summary["groups"] == len({r[1] for r in rows[1:]})
    assert summary["validation"]["grouped"]["sharing_a_group_with_train"] == 0
    assert summary["validation"]["random"]["sharing_a_group_with_train"] > 0
    assert f"{summary['groups']} source groups" in caplog.text
    with Image.open(out / "groups.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_leak_report_counts_a_planted_duplicate(copies_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "planted"
    shutil.copytree(copies_root, root)
    shutil.copy(root / "TRAIN" / "LYMPHOCYTE" / "2_3.jpeg", root / "TEST" / "LYMPHOCYTE" / "x.jpeg")
    overrides = [
        f"data.root={root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.split=TEST",
        "against=TRAIN",
    ]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("groups", overrides=overrides)
    result = report(cfg, tmp_path / "out")
    against = result["against"]
    assert against["TEST_images_with_a_duplicate_in_TRAIN"] == 1
    assert against["TRAIN_images_with_a_duplicate_in_TEST"] == 4  # the planted cell's copies
    assert against["shared_groups"] == 1
    assert shared_groups([0, 1, 1, 2], [0, 1], [2, 3]) == 1
