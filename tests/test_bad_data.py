"""Folders with broken, empty, mislabelled and odd-mode images: checked once, before training."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from cellcls.core.errors import CellclsError
from cellcls.core.images import ImageRefused
from cellcls.data.decode import DecodeImage, check_image, decode, decode_all
from cellcls.data.matching import features
from cellcls.data.store import load_images
from cellcls.train import train
from tests.conftest import FAST, PEAK_ANON, compose_run, make_dm, write_png_bomb

# File name -> the words its reason must contain.
BAD = {
    "empty.jpeg": "empty file (0 bytes)",
    "truncated.jpeg": "truncated",
    "text.jpeg": "not an image",
}
# Readable images in other modes and formats; each must become 3-channel RGB.
ODD = ("gray.png", "rgba.png", "palette.png", "cmyk.jpeg", "big.jpeg", "plain.png")


def add_files(folder: Path) -> None:
    """Bad, odd and non-image files next to the good images of one class folder."""
    good = sorted(folder.glob("*.jpeg"))[0]
    data = good.read_bytes()
    (folder / "empty.jpeg").touch()
    (folder / "truncated.jpeg").write_bytes(data[: len(data) // 2])
    (folder / "text.jpeg").write_text("these are my notes, not an image\n")
    with Image.open(good) as im:
        rgb = im.convert("RGB")
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpeg")
    rgb.resize((2400, 1800)).save(folder / "big.jpeg")
    rgb.save(folder / "plain.png")
    (folder / "notes.txt").write_text("not an image by extension\n")
    (folder / "Thumbs.db").write_bytes(b"\0" * 10)


@pytest.fixture
def messy(tiny_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "messy"
    shutil.copytree(tiny_root, root)
    add_files(root / "TRAIN" / "MONOCYTE")
    return root


@pytest.mark.parametrize("cache", [None, "memory", "disk"])
def test_unreadable_images_stop_the_run_with_a_list(messy: Path, tmp_path: Path, cache) -> None:
    with pytest.raises(CellclsError) as err:
        make_dm(messy, cache=cache, cache_dir=tmp_path / "store").setup("fit")
    msg = str(err.value)
    assert "3 image file(s)" in msg and "data.skip_bad_images=true" in msg
    for name, reason in BAD.items():
        line = next(
            ln for ln in msg.splitlines() if ln.strip().startswith(str(messy)) and name in ln
        )
        assert reason in line, line
    assert not any(name in msg for name in ODD)


@pytest.mark.parametrize("cache", [None, "disk"])
def test_skip_bad_images(messy: Path, tmp_path: Path, cache) -> None:
    dm = make_dm(messy, cache=cache, cache_dir=tmp_path / "store", skip_bad_images=True)
    dm.trainer = L.Trainer(default_root_dir=tmp_path / "run", logger=False)
    dm.setup("fit")
    assert {Path(p).name for p in dm.skipped} == set(BAD)
    assert len(dm.train_set) + len(dm.val_set) == 4 * 6 + len(ODD)
    paths = [p for p, _ in dm.train_set.dataset.samples]
    assert not set(paths) & set(dm.skipped)
    for x, _ in dm.train_dataloader():
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.uint8
    rows = list(csv.DictReader((tmp_path / "run" / "skipped_images.csv").open()))
    assert {Path(r["path"]).name: r["reason"] for r in rows}.keys() == set(BAD)


def test_odd_modes_become_rgb(messy: Path) -> None:
    folder = messy / "TRAIN" / "MONOCYTE"
    with Image.open(folder / "plain.png") as im:
        expected = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    for name in ODD:
        x = DecodeImage(32)(str(folder / name))
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8, name
    gray = DecodeImage(32)(str(folder / "gray.png"))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    rgba = DecodeImage(32)(str(folder / "rgba.png")).permute(1, 2, 0).numpy()
    assert np.array_equal(rgba, expected)  # the alpha channel is dropped, the colours kept


def test_non_images_by_extension_are_counted_once(messy: Path, caplog) -> None:
    dm = make_dm(messy, cache=None, skip_bad_images=True)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    ignored = [
        r.getMessage() for r in caplog.records if "not images by their extension" in r.message
    ]
    assert len(ignored) == 1 and "Ignoring 2 file(s)" in ignored[0]
    assert ".txt: 1" in ignored[0] and ".db: 1" in ignored[0]


def test_bad_file_in_cache_is_remembered_not_left_half_written(messy: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    paths = sorted(str(p) for p in (messy / "TRAIN" / "MONOCYTE").glob("*.jpeg"))
    images, bad, _ = load_images(paths, 24, store)
    assert {Path(p).name for p in bad} == set(BAD)
    assert all(images[paths.index(p)].sum() == 0 for p in bad)
    (npy,) = store.glob("*.npy")
    assert not list(store.glob("*.tmp*"))
    built = npy.stat().st_mtime_ns
    again, bad_again, _ = load_images(paths, 24, store)  # no decoding: the store lists bad files
    assert bad_again == bad and npy.stat().st_mtime_ns == built and torch.equal(again, images)


def test_a_bad_header_stops_the_run_before_any_store_or_group_is_written(
    messy: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    with pytest.raises(CellclsError) as err:
        make_dm(messy, cache="disk", cache_dir=store).prepare_data()
    assert "empty.jpeg: empty file" in str(err.value) and "text.jpeg: not an image" in str(
        err.value
    )
    assert not store.exists() or not list(store.iterdir())


def test_skipping_reuses_the_store_a_truncated_file_stopped(messy: Path, tmp_path: Path) -> None:
    """Only decoding finds a truncated file: the store is written, the run stops before grouping,
    and data.skip_bad_images=true reuses that store."""
    for name in ("empty.jpeg", "text.jpeg"):
        (messy / "TRAIN" / "MONOCYTE" / name).unlink()
    store = tmp_path / "store"
    failed = make_dm(messy, cache="disk", cache_dir=store)
    with pytest.raises(CellclsError, match="truncated.jpeg"):
        failed.prepare_data()
    (npy,) = store.glob("TRAIN-*.npy")
    assert not list(store.glob("groups-*"))
    built = npy.stat().st_mtime_ns
    skipping = make_dm(messy, cache="disk", cache_dir=store, skip_bad_images=True)
    skipping.prepare_data()
    skipping.setup("fit")
    assert list(store.glob("TRAIN-*.npy")) == [npy] and npy.stat().st_mtime_ns == built
    assert list(store.glob("groups-*")) and not list(store.glob("*.tmp*"))
    assert {Path(p).name for p in skipping.skipped} == {"truncated.jpeg"}


def test_every_reader_refuses_a_bomb_through_the_one_opener(tmp_path: Path) -> None:
    bomb = write_png_bomb(tmp_path / "bomb.png")
    why = "256 megapixels, over the limit of 89.5"
    assert why in check_image(bomb) and why in check_image(bomb, decode=False)
    for read in (lambda: decode(bomb, 32), lambda: features(bomb)):  # store, groups, predict
        with pytest.raises(ImageRefused, match=why):
            read()
    out = np.full((1, 8, 8, 3), 7, np.uint8)
    bad, _ = decode_all([str(bomb)], 8, out, progress=False)
    assert why in bad[str(bomb)] and not out.any()  # a zero row, listed


@pytest.mark.slow
def test_a_decompression_bomb_is_refused_by_name_before_it_is_decoded(
    kaggle_root: Path, tmp_path: Path
) -> None:
    """A 16000x16000 PNG (768 MB decoded) in TRAIN: one line naming it, before any store or
    group file, and the process never holds the image (it peaked at 5.8 GB when grouping read
    it; a train run that stops early holds about 0.5 GB of private memory)."""
    root = tmp_path / "blood-cells"
    shutil.copytree(kaggle_root, root)
    train_dir = next(root.rglob("TRAIN"))
    write_png_bomb(train_dir / "NEUTROPHIL" / "bomb.png")
    cache = tmp_path / "cache"
    args = [a for a in FAST if not a.startswith("data=")] + [f"data.root={root}"]
    result = subprocess.run(
        [sys.executable, "-c", PEAK_ANON, "cellcls.train", *args],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("CELLCLS_")}
        | {"CELLCLS_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    (line,) = [ln for ln in result.stderr.splitlines() if "bomb.png" in ln]
    assert "256 megapixels, over the limit of 89.5" in line and "not decoded" in line
    assert not list(cache.rglob("*.npy")) and not list(cache.rglob("groups-*"))
    peak_kb = int(result.stderr.rsplit("peak_anon_kb=", 1)[1].split()[0])
    print(f"peak private memory {peak_kb / 2**20:.2f} GB")
    assert peak_kb < 0.75 * 2**20, f"peak private memory {peak_kb / 2**20:.2f} GB"


def test_class_left_without_images_is_an_error(tiny_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    for f in (root / "TRAIN" / "EOSINOPHIL").iterdir():
        f.write_bytes(b"")
    with pytest.raises(CellclsError, match="holds no readable images"):
        make_dm(root, cache=None, skip_bad_images=True).setup("fit")


@pytest.mark.slow
def test_training_stops_before_fitting_on_a_bad_image(tiny_root: Path, in_tmp: Path) -> None:
    root = in_tmp / "data"
    shutil.copytree(tiny_root, root)
    (root / "TRAIN" / "LYMPHOCYTE" / "broken.jpeg").write_text("nope")
    args = [a for a in FAST if not a.startswith("data=")]
    with pytest.raises(CellclsError, match="broken.jpeg: not an image"):
        train(compose_run([*args, f"data.root={root}"], in_tmp / "run"))
    assert not (in_tmp / "run" / "checkpoints").exists()
