"""Decode every image once: a uint8 tensor store, in memory or memory-mapped from disk.

Decoding and resizing a JPEG costs about 1.5 ms of one core; doing it once instead of once per
epoch is what lets a 2-core machine feed the model. The disk store is a `.npy` file named by a
hash of the file list, sizes, modification times, `image_size` and the crop, so any change
rebuilds it, and it is memory-mapped copy-on-write: every process that opens it shares one
copy in RAM.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from cellcls.data.crop import find_cell, square_box
from cellcls.errors import CellclsError

log = logging.getLogger(__name__)


def decode(path: str | Path, size: int, crop: int | None = None) -> np.ndarray:
    """One image as an RGB uint8 array of `size` x `size` x 3 (PIL bilinear, antialiased).

    Any mode (grayscale, palette, RGBA, CMYK, 16-bit) becomes 3-channel RGB. With `crop`, a
    `crop`-pixel square around the white cell is cut out first (see `cellcls.data.crop`).
    """
    return decode_cell(path, size, crop)[0]


def decode_cell(path: str | Path, size: int, crop: int | None = None) -> tuple[np.ndarray, bool]:
    """`decode`, and whether the white cell was found (False: a centre crop was taken)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        found = True
        if crop is not None:
            centre = find_cell(np.asarray(im))
            found = centre is not None
            im = im.crop(square_box(centre, crop, im.width, im.height))
        return np.array(im.resize((size, size), Image.Resampling.BILINEAR)), found


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

    def __init__(self, size: int, crop: int | None = None) -> None:
        self.size, self.crop = size, crop

    def __call__(self, path: str) -> Tensor:
        return torch.from_numpy(decode(path, self.size, self.crop)).permute(2, 0, 1).contiguous()


def cache_key(paths: Sequence[str], size: int, crop: int | None = None) -> str:
    """A hash of every file's path, size and modification time, the image size and the crop."""
    h = hashlib.sha1((f"v1 {size}" + ("" if crop is None else f" crop{crop}") + "\n").encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks and container limits on Linux)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_all(
    paths: Sequence[str],
    size: int,
    out: np.ndarray,
    desc: str = "decoding",
    progress: bool = True,
    crop: int | None = None,
) -> tuple[dict[str, str], list[str]]:
    """Decode `paths` into `out` (N x size x size x 3), on all cores (PIL releases the GIL).

    Returns the files that could not be decoded, with the reason (their rows stay zero), and,
    with `crop`, the files in which no white cell was found (centre-cropped instead).
    """

    def work(i: int) -> tuple[str | None, bool]:
        try:
            out[i], found = decode_cell(paths[i], size, crop)
        except Exception as err:  # PIL raises many types for broken files
            out[i] = 0
            return unreadable(paths[i], err), True
        return None, found

    with ThreadPoolExecutor(cpu_count()) as pool:
        jobs = pool.map(work, range(len(paths)))
        results = list(tqdm(jobs, total=len(paths), desc=desc, unit="img", disable=not progress))
    bad = {p: why for p, (why, _) in zip(paths, results, strict=True) if why}
    return bad, [p for p, (_, found) in zip(paths, results, strict=True) if not found]


# Room for the .npy header (a few hundred bytes) and the list of bad files beside the store.
HEADROOM = 1 << 16


def free_space(folder: Path) -> int:
    """Bytes this user may still write on the filesystem of `folder` (or of its nearest
    existing parent, before it is created)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def no_space(folder: Path, needed: int, free: int) -> CellclsError:
    """The one-line error for a store that does not fit, with what to do instead."""
    return CellclsError(
        f"Not enough free space for the decoded-image cache in '{folder}': it needs "
        f"{needed / 1e6:,.1f} MB ({needed:,} bytes), {free / 1e6:,.1f} MB ({free:,} bytes) are "
        "free. Free some space, set CELLCLS_CACHE=<a folder on a larger disk> (or "
        "data.cache_dir=...), or pass data.cache=memory to keep the decoded images in memory "
        "for this run only."
    )


def remove_stale(folder: Path) -> None:
    """Delete temporary stores (`<store>.tmp<pid>-<host>`) left by builds on this machine that
    were killed: their process is gone. Builds still running, or on other hosts, are left."""
    host = socket.gethostname()
    for tmp in folder.glob("*.tmp*"):
        # `<host>` is missing in the names that earlier versions of cellcls gave.
        match = re.search(r"\.tmp(\d+)(?:-(.+))?$", tmp.name)
        if not match or match[2] not in (None, host) or process_alive(int(match[1])):
            continue
        tmp.unlink(missing_ok=True)
        log.info("Removed %s, left by an interrupted cache build.", tmp)


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def allocate(file: Path) -> None:
    """Reserve the disk blocks of `file` (made sparse by numpy) now, so that a full disk shows
    as ENOSPC here instead of a SIGBUS when the memory map is written. Where the platform or
    filesystem cannot, the free-space check has to do."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        return
    fd = os.open(file, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, file.stat().st_size)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        log.debug("Could not preallocate %s: %s", file, err)
    finally:
        os.close(fd)


def build_store(
    file: Path, paths: Sequence[str], size: int, desc: str, crop: int | None = None
) -> None:
    """Decode `paths` into the .npy store `file` (and, beside it, the lists of bad files and of
    files without a white cell found).

    Its size is known, so it is checked against the free space and allocated in full before any
    image is decoded: a full disk is a `CellclsError`, never a SIGBUS on the memory map. The
    store is written under a temporary name and renamed when complete; on any failure nothing
    is left behind.
    """
    shape = (len(paths), size, size, 3)
    needed = int(np.prod(shape)) + HEADROOM
    free = free_space(file.parent)
    if needed > free:
        raise no_space(file.parent, needed, free)
    file.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(file.parent)
    tmp = file.with_name(f"{file.name}.tmp{os.getpid()}-{socket.gethostname()}")
    bad_file, centred_file = file.with_suffix(".bad.json"), file.with_suffix(".centred.json")
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        allocate(tmp)
        bad, centred = decode_all(paths, size, array, desc=desc, crop=crop)
        array.flush()
        del array
        bad_file.write_text(json.dumps(bad, indent=1))
        centred_file.write_text(json.dumps(centred, indent=1))
        os.replace(tmp, file)  # only a complete store ever has the final name
    except OSError as err:
        if not file.exists():
            bad_file.unlink(missing_ok=True)
            centred_file.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space(file.parent, needed, free_space(file.parent)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def load_images(
    paths: Sequence[str],
    size: int,
    cache_dir: str | Path | None = None,
    name: str = "images",
    crop: int | None = None,
) -> tuple[Tensor, dict[str, str], list[str]]:
    """All images as one uint8 N x 3 x size x size tensor (a channels-last view of NHWC memory),
    the files that could not be decoded (path -> reason; their rows are zeros) and, with `crop`,
    the files in which no white cell was found (centre-cropped).

    With `cache_dir`, the decoded store is read from (or written to) disk and memory-mapped;
    without it, it is built in memory. The lists of files are stored beside the store, so a
    later run knows them without decoding anything.
    """
    shape = (len(paths), size, size, 3)
    if cache_dir is None:
        array = np.empty(shape, dtype=np.uint8)
        bad, centred = decode_all(paths, size, array, desc=f"decoding {name}", crop=crop)
        return torch.from_numpy(array).permute(0, 3, 1, 2), bad, centred
    tag = f"{size}px" if crop is None else f"{size}px-crop{crop}"
    file = Path(cache_dir) / f"{name}-{tag}-{cache_key(paths, size, crop)}.npy"
    if not file.exists():
        build_store(file, paths, size, f"caching {name} -> {file.parent}", crop)
        log.info("Decoded-image cache written: %s", file)
    array = np.load(file, mmap_mode="c")  # copy-on-write: shared pages, writable view
    if array.shape != shape:
        raise RuntimeError(f"{file} holds {array.shape}, expected {shape}; delete it")
    bad_file, centred_file = file.with_suffix(".bad.json"), file.with_suffix(".centred.json")
    bad = json.loads(bad_file.read_text()) if bad_file.exists() else {}
    centred = json.loads(centred_file.read_text()) if centred_file.exists() else []
    return torch.from_numpy(array).permute(0, 3, 1, 2), bad, centred


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

    def __init__(self, paths: Sequence[str], size: int, crop: int | None = None) -> None:
        self.paths = list(paths)
        self.size, self.crop = size, crop
        self.unreadable: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> Tensor:
        paths = [self.paths[i] for i in indices]
        batch = np.empty((len(paths), self.size, self.size, 3), dtype=np.uint8)
        self.unreadable |= decode_all(paths, self.size, batch, progress=False, crop=self.crop)[0]
        return torch.from_numpy(batch).permute(0, 3, 1, 2)


def split_rows(dataset: Dataset) -> tuple[CachedImages, Tensor, Tensor]:
    """The store, store rows and labels of a `CachedImages` or a `Subset` of one."""
    if isinstance(dataset, Subset):
        full, picked = dataset.dataset, torch.as_tensor(dataset.indices, dtype=torch.long)
    else:
        full, picked = dataset, torch.arange(len(dataset))
    if not isinstance(full, CachedImages):
        raise TypeError(f"not a decoded-image store: {type(full).__name__}")
    return full, full.rows[picked], full.targets[picked]


def store_bytes(dataset: Dataset) -> int:
    """Bytes one split's images take once copied out of the store."""
    full, rows, _ = split_rows(dataset)
    return len(rows) * full.images[0].numel() * full.images.element_size()


class DeviceBatches:
    """Batches of one split whose images and labels were copied once onto the training device.

    Each batch is one `index_select` there: no DataLoader, no worker process, no host-to-device
    copy per batch, so a GPU is not kept waiting by a 2-core host (Colab's T4). Shuffled with
    the device's global RNG, which Lightning's `seed_everything` seeds. Batches are uint8 NCHW
    views of channels-last memory, like `CachedImages.__getitems__`.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, device: torch.device, shuffle: bool = False
    ) -> None:
        full, rows, targets = split_rows(dataset)
        # NHWC rows, as the store holds them; the one copy to the device.
        self.images = full.images.permute(0, 2, 3, 1).index_select(0, rows).to(device)
        self.targets = targets.to(device)
        self.batch_size, self.shuffle = batch_size, shuffle

    def __len__(self) -> int:
        return -(-len(self.targets) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n, device = len(self.targets), self.targets.device
        order = torch.randperm(n, device=device) if self.shuffle else torch.arange(n, device=device)
        for idx in order.split(self.batch_size):
            yield self.images.index_select(0, idx).permute(0, 3, 1, 2), self.targets[idx]
