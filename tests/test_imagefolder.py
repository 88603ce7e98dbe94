"""data=imagefolder: other datasets' layouts (PBC, Raabin-WBC), user groups, mixed image files."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cellcls.core.errors import CellclsError
from cellcls.data.datamodule import ImageFolderDataModule
from cellcls.data.decode import decode_cell
from cellcls.data.generate import generate_dataset
from cellcls.data.layout import class_folders
from cellcls.run.checkpoint import load_checkpoint
from cellcls.train import train
from tests.conftest import compose_run

PBC = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil",
       "platelet"]  # fmt: skip


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 TRAIN and 4 TEST images per class, 2 copies per source cell, Kaggle's layout."""
    return generate_dataset(tmp_path_factory.mktemp("if") / "k", 12, 4, copies=2, progress=False)


def pbc_layout(cells: Path, root: Path) -> Path:
    """PBC's layout: one folder per class (8 of them, each half of a generated class's cells,
    whole cells kept together), no split."""
    for k, folder in enumerate(sorted((cells / "TRAIN").iterdir())):
        files = sorted(folder.iterdir())
        for half, name in enumerate(PBC[2 * k : 2 * k + 2]):
            (root / name).mkdir(parents=True)
            for f in files[half * 6 : half * 6 + 6]:  # 3 source cells of 2 copies
                shutil.copy(f, root / name / f.name)
    return root


def make(root: Path, **kw) -> ImageFolderDataModule:
    kw = {"image_size": 32, "batch_size": 4, "num_workers": 0, "cache": "memory"} | kw
    return ImageFolderDataModule(root, **kw)


def groups_of(dm: ImageFolderDataModule, subset) -> set[int]:
    groups = dm.source_groups(dm.hparams.train_split)
    samples = subset.dataset.samples
    return {groups[samples[i][0]] for i in subset.indices}


def test_pbc_layout_discovers_classes_and_draws_a_grouped_test_part(
    cells: Path, tmp_path: Path
) -> None:
    root = pbc_layout(cells, tmp_path / "PBC_dataset_normal_DIB")
    assert class_folders(root) == PBC
    dm = make(root, train_split=None, split="test", classes=None)
    dm.setup()
    assert dm.classes == PBC
    train, val, test = (groups_of(dm, s) for s in (dm.train_set, dm.val_set, dm.test_set))
    assert train and val and test
    assert not train & val and not train & test and not val & test  # whole cells, one side each
    sizes = len(dm.train_set) + len(dm.val_set) + len(dm.test_set)
    assert sizes == 8 * 6  # every image once
    labels = {dm.test_set.dataset.samples[i][1] for i in dm.test_set.indices}
    assert labels == set(range(8))  # each class drawn into the test part
    again = make(root, train_split=None, split="test")
    again.setup("test")
    assert again.test_paths == dm.test_paths  # seeded: eval redraws the same part
    other = make(root, train_split=None, split="test", seed=7)
    other.setup("test")
    assert other.test_paths != dm.test_paths


def test_a_class_with_too_few_groups_is_refused_by_name(cells: Path, tmp_path: Path) -> None:
    root = pbc_layout(cells, tmp_path / "pbc")
    for f in sorted((root / "platelet").iterdir())[2:]:
        f.unlink()  # one source cell left
    with pytest.raises(CellclsError, match=r"class platelet has 1 source group\(s\) \(2 images\)"):
        make(root, train_split=None, split="test").setup("fit")


def test_split_folders_without_train_split_are_named(cells: Path) -> None:
    with pytest.raises(CellclsError, match="holds split folders .*data.train_split=TRAIN"):
        class_folders(cells)


def test_raabin_test_folder_without_two_classes_is_reported(cells: Path, tmp_path: Path) -> None:
    root = tmp_path / "raabin"
    shutil.copytree(cells / "TRAIN", root / "Train")
    shutil.copytree(cells / "TEST", root / "TestB")
    for name in ("EOSINOPHIL", "MONOCYTE"):
        shutil.rmtree(root / "TestB" / name)
    dm = make(root, train_split="Train", split="TestB", classes=None)
    dm.setup("test")
    labels = {label for _, label in dm.test_set.samples}
    assert labels == {dm.classes.index("LYMPHOCYTE"), dm.classes.index("NEUTROPHIL")}
    assert len(dm.classes) == 4 and len(dm.test_paths) == 2 * 4


def test_user_groups_csv(cells: Path, tmp_path: Path) -> None:
    """Slide IDs from a CSV: the splits keep each slide whole; unlisted images are refused."""
    rows = []
    for path in sorted((cells / "TRAIN").rglob("*.jpeg")):  # <source>_<copy>.jpeg
        slide = f"{path.parent.name}{int(path.stem.split('_')[0]) // 2}"  # 2 cells per slide
        rows.append((path.relative_to(cells).as_posix(), slide))
    file = tmp_path / "slides.csv"
    with file.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "group"), *rows])
    dm = make(cells, groups=str(file))
    dm.setup("fit")
    assert not groups_of(dm, dm.train_set) & groups_of(dm, dm.val_set)
    by_path = dict(rows)
    slides = {by_path[Path(p).relative_to(cells).as_posix()] for p in dm.source_groups("TRAIN")}
    assert len(set(dm.source_groups("TRAIN").values())) == len(slides)
    with file.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "group"), *rows[1:]])
    with pytest.raises(CellclsError, match=r"lists no group for 1 of 48 images"):
        make(cells, groups=str(file)).setup("fit")


def test_groups_none_makes_every_image_its_own(cells: Path) -> None:
    dm = make(cells, groups="none")
    assert len(set(dm.source_groups("TRAIN").values())) == 4 * 12


def test_statistics_are_measured_on_the_training_images(cells: Path) -> None:
    dm = make(cells, crop=0.5, mean="auto", std="auto")
    dm.setup("fit")
    stats = dm.statistics
    assert stats["images"] == len(dm.train_set)
    rows = dm.train_set.dataset.rows[dm.train_set.indices]
    x = dm.train_set.dataset.images[rows].double() / 255
    assert stats["mean"] == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-6)
    assert stats["std"] == pytest.approx(x.std((0, 2, 3), correction=0).tolist(), abs=1e-6)
    given = make(cells, mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])
    given.setup("fit")
    assert given.statistics["mean"] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("L", ".png"), ("RGBA", ".png"), ("P", ".bmp"), ("I;16", ".png"), ("I;16", ".tif")],
)
def test_mixed_modes_become_8_bit_rgb(tmp_path: Path, mode: str, suffix: str) -> None:
    grey = np.linspace(0, 1, 64 * 48).reshape(48, 64)
    if mode == "I;16":
        im = Image.fromarray((grey * 65535).astype(np.uint16))  # mode I;16
    else:
        im = Image.fromarray((grey * 255).astype(np.uint8), "L").convert(mode)
    path = tmp_path / f"x{suffix}"
    im.save(path)
    out, _ = decode_cell(path, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert 100 < out.mean() < 155 and out.max() > 200  # the range kept, not clipped to white


def test_crop_fraction_follows_the_image_scale(cells: Path, tmp_path: Path) -> None:
    """A 320x240 image and its 640x480 upscale: crop=0.5 cuts the same cell from both."""
    small = sorted((cells / "TRAIN" / "LYMPHOCYTE").iterdir())[0]
    big = tmp_path / "big.png"
    with Image.open(small) as im:
        im.resize((im.width * 2, im.height * 2), Image.Resampling.BICUBIC).save(big)
    a, _ = decode_cell(small, 64, crop=0.5)
    b, _ = decode_cell(big, 64, crop=0.5)
    diff = np.abs(a.astype(float) - b.astype(float)).mean()
    assert diff < 6, diff  # the same square, resampled (pixel crops would differ by far more)
    c, _ = decode_cell(big, 64, crop=120)
    assert np.abs(a.astype(float) - c.astype(float)).mean() > 2 * diff


def test_mixed_sizes_and_modes_train_through_the_store(cells: Path, tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    shutil.copytree(cells, root)
    files = sorted((root / "TRAIN").rglob("*.jpeg"))
    for i, f in enumerate(files[::5]):
        with Image.open(f) as im:
            im = im.resize((200 + 20 * i, 150 + 10 * i))
            im = [im.convert("L"), im.convert("RGBA"), im.convert("P")][i % 3]
            im.save(f.with_suffix(".png"))
        f.unlink()
    dm = make(root, cache="disk", cache_dir=tmp_path / "cache", mean="auto", std="auto")
    dm.prepare_data()
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
    assert len(dm.train_set) + len(dm.val_set) == 4 * 12


ONE_STEP = ["trainer.max_epochs=1", "+trainer.limit_train_batches=1"]
ONE_STEP += ["+trainer.limit_val_batches=1", "trainer.accelerator=cpu"]
ONE_STEP += ["callbacks.progress_bar.refresh_rate=0"]


@pytest.mark.parametrize("layout", ["pbc", "raabin", "slides"])
def test_data_imagefolder_trains_a_step_and_keeps_its_statistics(
    cells: Path, in_tmp: Path, layout: str
) -> None:
    """data=imagefolder with only data.root (and the layout's split names): one training step,
    the test report, and the measured normalisation in the checkpoint."""
    args = ["data=imagefolder", "data.image_size=32", "data.num_workers=0", *ONE_STEP]
    if layout == "pbc":
        root = pbc_layout(cells, in_tmp / "pbc")
    elif layout == "raabin":
        root = in_tmp / "raabin"
        shutil.copytree(cells / "TRAIN", root / "Train")
        shutil.copytree(cells / "TEST", root / "TestB")
        shutil.rmtree(root / "TestB" / "MONOCYTE")
        args += ["data.train_split=Train", "data.split=TestB"]
    else:  # a user's slide IDs, in Kaggle's layout
        root, file = cells, in_tmp / "slides.csv"
        paths = sorted(cells.rglob("*.jpeg"))  # TRAIN and TEST: the report needs both
        with file.open("w", newline="") as f:
            csv.writer(f).writerows(
                [("path", "group")] + [(p.relative_to(cells).as_posix(), p.stem[0]) for p in paths]
            )
        args += ["data.train_split=TRAIN", "data.split=TEST", f"data.groups={file}"]
    out = in_tmp / "run"
    train(compose_run([*args, f"data.root={root}"], out))
    metrics = (out / "metrics.json").read_text()
    assert '"accuracy"' in metrics
    (ckpt,) = (out / "checkpoints").glob("epoch_*.ckpt")
    hp = load_checkpoint(ckpt)["hyper_parameters"]
    assert hp["normalization"] == "data" and len(hp["mean"]) == 3
    assert all(0.2 < m < 1 for m in hp["mean"]) and all(0.01 < v < 0.5 for v in hp["std"])
    state = load_checkpoint(ckpt)["state_dict"]
    assert state["mean"].flatten().tolist() == pytest.approx(hp["mean"])
