"""Decode every image once: a uint8 tensor store, in memory or memory-mapped from disk.

Decoding and resizing a JPEG costs about 1.5 ms of one core; doing it once instead of once per
epoch is what lets a 2-core machine feed the model. The disk store is a `.npy` file named by a
hash of the file list, sizes, modification times and `image_size`, so any change rebuilds it,
and it is memory-mapped copy-on-write: every process that opens it shares one copy in RAM.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def decode(path: str | Path, size: int) -> np.ndarray:
    """One image as an RGB uint8 array of `size` x `size` x 3 (PIL bilinear, antialiased)."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


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
) -> None:
    """Decode `paths` into `out` (N x size x size x 3), on all cores (PIL releases the GIL)."""

    def work(i: int) -> None:
        out[i] = decode(paths[i], size)

    with ThreadPoolExecutor(cpu_count()) as pool:
        jobs = pool.map(work, range(len(paths)))
        for _ in tqdm(jobs, total=len(paths), desc=desc, unit="img", disable=not progress):
            pass


def load_images(
    paths: Sequence[str], size: int, cache_dir: str | Path | None = None, name: str = "images"
) -> Tensor:
    """All images as one uint8 N x 3 x size x size tensor (a channels-last view of NHWC memory).

    With `cache_dir`, the decoded store is read from (or written to) disk and memory-mapped;
    without it, it is built in memory.
    """
    shape = (len(paths), size, size, 3)
    if cache_dir is None:
        array = np.empty(shape, dtype=np.uint8)
        decode_all(paths, size, array, desc=f"decoding {name}")
    else:
        file = Path(cache_dir) / f"{name}-{size}px-{cache_key(paths, size)}.npy"
        if not file.exists():
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(f".tmp{os.getpid()}")
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            decode_all(paths, size, array, desc=f"caching {name} -> {file.parent}")
            array.flush()
            del array
            os.replace(tmp, file)  # only a complete store ever has the final name
            log.info("Decoded-image cache written: %s", file)
        array = np.load(file, mmap_mode="c")  # copy-on-write: shared pages, writable view
        if array.shape != shape:
            raise RuntimeError(f"{file} holds {array.shape}, expected {shape}; delete it")
    return torch.from_numpy(array).permute(0, 3, 1, 2)


class CachedImages(Dataset):
    """Decoded images and their labels; whole batches are fetched with one indexing operation."""

    def __init__(
        self, images: Tensor, samples: Sequence[tuple[str, int]], classes: Sequence[str]
    ) -> None:
        self.images = images
        self.samples = list(samples)
        self.classes = list(classes)
        self.targets = torch.tensor([label for _, label in self.samples])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.targets[i]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        # DataLoader hands a batch's indices here; collate_fn must then pass the batch through.
        idx = torch.as_tensor(indices)
        return self.images[idx].contiguous(), self.targets[idx]
