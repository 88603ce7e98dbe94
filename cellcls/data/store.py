"""The decoded-image store: every image decoded once into a uint8 array, in memory or on disk.

The disk store is a `.npy` file named by a hash of the file list, sizes, modification times,
`image_size` and the crop, so any change rebuilds it, and it is memory-mapped copy-on-write:
every process that opens it shares one copy in RAM. Its size is known before it is built, so a
full disk is a one-line error, never a SIGBUS on the memory map.
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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cellcls.core.errors import CellclsError
from cellcls.data.decode import decode_all

log = logging.getLogger(__name__)


def cache_key(paths: Sequence[str], size: int, crop: float | None = None) -> str:
    """A hash of every file's path, size and modification time, the image size and the crop."""
    h = hashlib.sha1((f"v1 {size}" + ("" if crop is None else f" crop{crop}") + "\n").encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


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
    file: Path, paths: Sequence[str], size: int, desc: str, crop: float | None = None
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
    crop: float | None = None,
    build: bool = True,
) -> tuple[Tensor, dict[str, str], list[str]]:
    """All images as one uint8 N x 3 x size x size tensor (a channels-last view of NHWC memory),
    the files that could not be decoded (path -> reason; their rows are zeros) and, with `crop`,
    the files in which no white cell was found (centre-cropped).

    With `cache_dir`, the decoded store is read from (or, with `build`, written to) disk and
    memory-mapped; without it, or without `build` and no store there yet, it is built in memory.
    The lists of files are stored beside the store, so a later run knows them without decoding
    anything.
    """
    shape = (len(paths), size, size, 3)
    tag = f"{size}px" if crop is None else f"{size}px-crop{crop}"
    file = (
        None
        if cache_dir is None
        else Path(cache_dir) / f"{name}-{tag}-{cache_key(paths, size, crop)}.npy"
    )
    if file is not None and not file.exists() and not build:
        log.info("No decoded-image store at %s yet: decoding %s in memory.", file, name)
        file = None
    if file is None:
        array = np.empty(shape, dtype=np.uint8)
        bad, centred = decode_all(paths, size, array, desc=f"decoding {name}", crop=crop)
        return torch.from_numpy(array).permute(0, 3, 1, 2), bad, centred
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
