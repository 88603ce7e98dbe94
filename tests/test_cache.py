"""The decoded-image cache: same pixels as decoding, rebuilt on any change, same batches."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from cellcls.core.errors import CellclsError
from cellcls.data.datamodule import BloodCellsDataModule
from cellcls.data.decode import DecodeImage
from cellcls.data.store import load_images
from tests.conftest import CLASSES


def train_paths(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "TRAIN").rglob("*.jpeg"))


def test_cached_equals_fresh_decode(tiny_root: Path, tmp_path: Path) -> None:
    paths = train_paths(tiny_root)
    for cache_dir in (None, tmp_path):
        images, *_ = load_images(paths, 40, cache_dir)
        assert images.shape == (len(paths), 3, 40, 40) and images.dtype == torch.uint8
        fresh = torch.stack([DecodeImage(40)(p) for p in paths])
        assert torch.equal(images, fresh)


def test_cache_rebuilt_when_files_or_size_change(tiny_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    store = tmp_path / "store"
    paths = train_paths(root)
    load_images(paths, 32, store)
    (first,) = store.glob("*.npy")
    built = first.stat().st_mtime_ns
    load_images(paths, 32, store)  # unchanged: reused, not rebuilt
    assert list(store.glob("*.npy")) == [first] and first.stat().st_mtime_ns == built

    load_images(paths, 24, store)  # another image size is another store
    assert len(list(store.glob("*.npy"))) == 2

    changed = Path(paths[0])
    Image.new("RGB", (320, 240), (255, 0, 0)).save(changed)
    os.utime(changed, ns=(built + 10**9, built + 10**9))
    images, *_ = load_images(paths, 32, store)
    assert len(list(store.glob("*.npy"))) == 3
    assert images[0, 0].float().mean() > 250 and images[0, 1].float().mean() < 5

    added = changed.with_name("added.jpeg")
    shutil.copy(paths[1], added)
    more, *_ = load_images(train_paths(root), 32, store)
    assert len(more) == len(paths) + 1 and len(list(store.glob("*.npy"))) == 4
    assert not list(store.glob("*.tmp*")), "an interrupted build must not leave its temp file"


def first_batch(dm: BloodCellsDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    L.seed_everything(3)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    return x, y


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_same_first_batch_with_and_without_cache(tiny_root: Path, tmp_path: Path, cache) -> None:
    kw = {"classes": CLASSES, "image_size": 36, "batch_size": 8, "num_workers": 0}
    plain = first_batch(BloodCellsDataModule(tiny_root, cache=None, **kw))
    cached = first_batch(BloodCellsDataModule(tiny_root, cache=cache, cache_dir=tmp_path, **kw))
    assert torch.equal(plain[0], cached[0]) and torch.equal(plain[1], cached[1])
    assert plain[0].dtype == torch.uint8 and plain[0].shape == (8, 3, 36, 36)


def fake_free_space(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """Make every filesystem report `free` bytes available (tests cannot fill a disk)."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))


def test_store_that_does_not_fit_is_refused(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = train_paths(tiny_root)
    needed = len(paths) * 32 * 32 * 3  # the decoded images alone
    fake_free_space(monkeypatch, needed // 2)
    store = tmp_path / "store"
    with pytest.raises(CellclsError) as err:
        load_images(paths, 32, store)
    msg = str(err.value)
    assert "\n" not in msg and f"'{store}'" in msg
    assert f"{needed // 2:,} bytes) are free" in msg and "needs 0.1 MB" in msg
    assert "data.cache=memory" in msg and "CELLCLS_CACHE=" in msg
    assert not store.exists()  # nothing written, not even the folder

    # The check passed, but the disk fills before the store is allocated: the same message.
    fake_free_space(monkeypatch, 10**12)

    def disk_full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", disk_full, raising=False)
    with pytest.raises(CellclsError, match="Not enough free space for the decoded-image cache"):
        load_images(paths, 32, store)
    assert list(store.iterdir()) == []  # no partial store, no list of bad files

    monkeypatch.undo()
    images, *_ = load_images(paths, 32, store)  # with room, it is built as usual
    assert len(images) == len(paths) and len(list(store.glob("*.npy"))) == 1


@pytest.mark.slow
def test_stale_temporary_stores_are_removed(tiny_root: Path, tmp_path: Path) -> None:
    """Leftovers of builds killed earlier go; a build still running, or on another host, stays."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    pid, host = int(dead.stdout), socket.gethostname()
    store = tmp_path / "store"
    store.mkdir()
    leftovers = {
        f"TRAIN-32px-0123.npy.tmp{pid}-{host}": False,
        f"TRAIN-32px-4567.tmp{pid}": False,  # as earlier versions named them
        f"TRAIN-32px-89ab.npy.tmp{os.getpid()}-{host}": True,  # alive: this process
        f"TRAIN-32px-cdef.npy.tmp{pid}-another-host": True,
    }
    for name in leftovers:
        (store / name).write_bytes(b"\0" * 100)
    load_images(train_paths(tiny_root), 32, store)
    for name, kept in leftovers.items():
        assert (store / name).exists() == kept, name
