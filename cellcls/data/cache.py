"""Decode every image once: a uint8 tensor store, in memory or memory-mapped from disk.

Decoding and resizing a JPEG costs about 1.5 ms of one core; doing it once instead of once per
epoch is what lets a 2-core machine feed the model. The disk store is a `.npy` file named by a
hash of the file list, sizes, modification times and `image_size`, so any change rebuilds it,
and it is memory-mapped copy-on-write: every process that opens it shares one copy in RAM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def decode(path: str | Path, size: int) -> np.ndarray:
    """One image as an RGB uint8 array of `size` x `size` x 3 (PIL bilinear, antialiased).

    Any mode (grayscale, palette, RGBA, CMYK, 16-bit) becomes 3-channel RGB.
    """
    with Image.open(path) as im:
        return np.array(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


def unreadable(path: str | Path, err: Exception) -> str:
    """Why an image file could not be decoded, in words (the path is said elsewhere)."""
    if os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    if isinstance(err, UnidentifiedImageError):
        return "not an image (no known image format)"
    return f"{type(err).__name__}: {str(err).replace(str(path), '').strip()[:200]}"


def check_image(path: str | Path) -> str | None:
    """Why `path` cannot be decoded, or None if it can; cheaper than `decode`.

    The whole file is read (a truncated file fails), but JPEGs are decoded at 1/8 scale.
    """
    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
    except Exception as err:  # PIL raises many types for broken files
        return unreadable(path, err)
    return None


def check_images(paths: Sequence[str], desc: str = "checking") -> dict[str, str]:
    """The files among `paths` that cannot be decoded, with the reason; on all cores."""
    with ThreadPoolExecutor(cpu_count()) as pool:
        reasons = list(tqdm(pool.map(check_image, paths), total=len(paths), desc=desc, unit="img"))
    return {p: why for p, why in zip(paths, reasons, strict=True) if why}


class DecodeImage:
    """Transform for ImageFolder: a file's image as a uint8 CHW tensor, exactly as cached."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, path: str) -> Tensor:
        return torch.from_numpy(decode(path, self.size)).permute(2, 0, 1).contiguous()


def cache_key(paths: Sequence[str], size: int) -> str:
    """A hash of every file's path, size and modification time, and the image size."""
    h = hashlib.sha1(f"v1 {size}\n".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks and container limits on Linux)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_all(
    paths: Sequence[str], size: int, out: np.ndarray, desc: str = "decoding", progress: bool = True
) -> dict[str, str]:
    """Decode `paths` into `out` (N x size x size x 3), on all cores (PIL releases the GIL).

    Returns the files that could not be decoded, with the reason; their rows stay zero.
    """

    def work(i: int) -> str | None:
        try:
            out[i] = decode(paths[i], size)
        except Exception as err:  # PIL raises many types for broken files
            out[i] = 0
            return unreadable(paths[i], err)
        return None

    with ThreadPoolExecutor(cpu_count()) as pool:
        jobs = pool.map(work, range(len(paths)))
        reasons = list(tqdm(jobs, total=len(paths), desc=desc, unit="img", disable=not progress))
    return {p: why for p, why in zip(paths, reasons, strict=True) if why}


def load_images(
    paths: Sequence[str], size: int, cache_dir: str | Path | None = None, name: str = "images"
) -> tuple[Tensor, dict[str, str]]:
    """All images as one uint8 N x 3 x size x size tensor (a channels-last view of NHWC memory),
    and the files that could not be decoded (path -> reason; their rows are zeros).

    With `cache_dir`, the decoded store is read from (or written to) disk and memory-mapped;
    without it, it is built in memory. The list of bad files is stored beside the store, so a
    later run knows it without decoding anything.
    """
    shape = (len(paths), size, size, 3)
    if cache_dir is None:
        array = np.empty(shape, dtype=np.uint8)
        bad = decode_all(paths, size, array, desc=f"decoding {name}")
        return torch.from_numpy(array).permute(0, 3, 1, 2), bad
    file = Path(cache_dir) / f"{name}-{size}px-{cache_key(paths, size)}.npy"
    bad_file = file.with_suffix(".bad.json")
    if not file.exists():
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        try:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            bad = decode_all(paths, size, array, desc=f"caching {name} -> {file.parent}")
            array.flush()
            del array
            bad_file.write_text(json.dumps(bad, indent=1))
            os.replace(tmp, file)  # only a complete store ever has the final name
        finally:
            tmp.unlink(missing_ok=True)
        log.info("Decoded-image cache written: %s", file)
    array = np.load(file, mmap_mode="c")  # copy-on-write: shared pages, writable view
    if array.shape != shape:
        raise RuntimeError(f"{file} holds {array.shape}, expected {shape}; delete it")
    bad = json.loads(bad_file.read_text()) if bad_file.exists() else {}
    return torch.from_numpy(array).permute(0, 3, 1, 2), bad


class CachedImages(Dataset):
    """Decoded images and their labels; whole batches are fetched with one indexing operation."""

    def __init__(
        self,
        images: Tensor,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        rows: Sequence[int] | None = None,
    ) -> None:
        self.images = images
        self.samples = list(samples)
        self.classes = list(classes)
        self.targets = torch.tensor([label for _, label in self.samples])
        # The store row of each sample: skipped files keep their row but have no sample.
        self.rows = torch.arange(len(self.samples)) if rows is None else torch.as_tensor(rows)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[self.rows[i]], self.targets[i]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        # DataLoader hands a batch's indices here; collate_fn must then pass the batch through.
        idx = torch.as_tensor(indices)
        # A row copy from the store's own NHWC memory (index_select), viewed as NCHW: about 6x
        # faster than fancy indexing the NCHW view, and already channels-last for the model.
        rows = self.images.permute(0, 2, 3, 1).index_select(0, self.rows[idx])
        return rows.permute(0, 3, 1, 2), self.targets[idx]


class ImageFiles(Dataset):
    """Image files without labels, decoded as the training images are (uint8, `size` x `size`).

    Whole batches are decoded at once on all cores (`__getitems__`, with `batch_as_is` as the
    DataLoader's collate_fn), so a folder of any size needs the memory of one batch. A file that
    cannot be decoded gives a zero image and is recorded in `unreadable` (path -> reason): use
    the DataLoader in this process (num_workers=0) to read it afterwards.
    """

    def __init__(self, paths: Sequence[str], size: int) -> None:
        self.paths = list(paths)
        self.size = size
        self.unreadable: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> Tensor:
        paths = [self.paths[i] for i in indices]
        batch = np.empty((len(paths), self.size, self.size, 3), dtype=np.uint8)
        self.unreadable |= decode_all(paths, self.size, batch, progress=False)
        return torch.from_numpy(batch).permute(0, 3, 1, 2)
