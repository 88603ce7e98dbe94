"""Decoding image files: one image as the store holds it, on all cores; why a file is unreadable.

Decoding and resizing a JPEG costs about 1.5 ms of one core; the store (`cellcls.data.store`)
does it once per image instead of once per epoch.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from cellcls.core.images import ImageRefused, open_image
from cellcls.data.crop import find_cell, square_box

log = logging.getLogger(__name__)


def decode(path: str | Path, size: int, crop: float | None = None) -> np.ndarray:
    """One image as an RGB uint8 array of `size` x `size` x 3 (PIL bilinear, antialiased).

    Any mode becomes 3-channel 8-bit RGB (`to_rgb8`). With `crop`, a square around the white
    cell is cut out first (see `cellcls.data.crop`): `crop` pixels, or, below 1, that fraction
    of the image's shorter side, so that it follows the image's scale.
    """
    return decode_cell(path, size, crop)[0]


def decode_cell(path: str | Path, size: int, crop: float | None = None) -> tuple[np.ndarray, bool]:
    """`decode`, and whether the white cell was found (False: a centre crop was taken)."""
    with open_image(path) as im:
        cell = cut_cell(im, size, crop)
        return cell.image, cell.found


class Cell(NamedTuple):
    """What the model sees of one image, and where in the image it came from."""

    image: np.ndarray  # size x size x 3, uint8 RGB
    box: tuple[int, int, int, int] | None  # (left, top, right, bottom) in its pixels; no crop: None
    found: bool  # the white cell was found (False: a centre crop was taken)


def cut_cell(im: Image.Image, size: int, crop: float | None = None) -> Cell:
    """An opened image as the store holds it: 8-bit RGB, cropped around the white cell (with
    `crop`), resized to `size` x `size`. The one preprocessing of training, eval and the API."""
    im = to_rgb8(im)
    box, found = None, True
    if crop is not None:
        centre = find_cell(np.asarray(im))
        found = centre is not None
        box = square_box(centre, crop_side(crop, im.size), im.width, im.height)
        im = im.crop(box)
    return Cell(np.array(im.resize((size, size), Image.Resampling.BILINEAR)), box, found)


def crop_side(crop: float, size: tuple[int, int]) -> int:
    """The crop's side in pixels: `crop` itself, or a fraction (<= 1) of the shorter side."""
    return round(crop * min(size)) if crop <= 1 else int(crop)


# Modes that hold more than 8 bits per sample (16-bit PNG/TIFF greys, 32-bit integer or float).
WIDE = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any mode as 8-bit RGB: palettes, greys, RGBA (alpha dropped) and CMYK through PIL's own
    conversion; wider greys scaled from their 16-bit range (PIL would clip them at 255)."""
    if im.mode == "RGB":
        return im
    if im.mode in WIDE:
        wide = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode != "F" or wide.max() > 1 else 1.0
        grey = np.clip(wide / top * 255 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return im.convert("RGB")


def source_mode(path: str | Path) -> str | None:
    """An image file's mode, from its header only (None: unreadable)."""
    try:
        with open_image(path) as im:
            return im.mode
    except Exception:  # reported by the decode that follows
        return None


def unreadable(path: str | Path, err: Exception) -> str:
    """Why an image file could not be decoded, in words (the path is said elsewhere)."""
    if isinstance(err, ImageRefused):
        return str(err)
    return f"{type(err).__name__}: {str(err).replace(str(path), '').strip()[:200]}"


def check_image(path: str | Path, decode: bool = True) -> str | None:
    """Why `path` cannot be decoded, or None if it can; cheaper than `decode`.

    With `decode`, the whole file is read (a truncated file fails), but JPEGs are decoded at 1/8
    scale; without, only the header (`open_image`'s refusals: empty, not an image, oversized).
    """
    try:
        with open_image(path) as im:
            if decode:
                im.draft("RGB", (64, 64))
                im.load()
    except Exception as err:  # PIL raises many types for broken files
        return unreadable(path, err)
    return None


def check_images(
    paths: Sequence[str], desc: str = "checking", decode: bool = True
) -> dict[str, str]:
    """The files among `paths` that cannot be decoded (`check_image`), with the reason; on all
    cores. Without `decode`, headers only: a second for 10,000 images, before any stage that
    decodes them all."""
    check = functools.partial(check_image, decode=decode)
    with ThreadPoolExecutor(cpu_count()) as pool:
        jobs = pool.map(check, paths)
        reasons = list(tqdm(jobs, total=len(paths), desc=desc, unit="img", disable=not decode))
    return {p: why for p, why in zip(paths, reasons, strict=True) if why}


class DecodeImage:
    """Transform for ImageFolder: a file's image as a uint8 CHW tensor, exactly as cached."""

    def __init__(self, size: int, crop: float | None = None) -> None:
        self.size, self.crop = size, crop

    def __call__(self, path: str) -> Tensor:
        return torch.from_numpy(decode(path, self.size, self.crop)).permute(2, 0, 1).contiguous()


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks and container limits on Linux)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_all(
    paths: Sequence[str],
    size: int,
    out: np.ndarray,
    desc: str = "decoding",
    progress: bool = True,
    crop: float | None = None,
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
        modes = Counter(pool.map(source_mode, paths))
    converted = {m: n for m, n in modes.items() if m not in ("RGB", None)}
    if converted:
        log.info(
            "%s: converted to 8-bit RGB: %s of %d images",
            desc,
            ", ".join(f"{n} {m}" for m, n in sorted(converted.items())),
            len(paths),
        )
    bad = {p: why for p, (why, _) in zip(paths, results, strict=True) if why}
    return bad, [p for p, (_, found) in zip(paths, results, strict=True) if not found]


def list_unreadable(bad: Mapping[str, str]) -> str:
    """Unreadable files, one `  path: reason` line each, for the log or an error message."""
    return "\n".join(f"  {path}: {why}" for path, why in sorted(bad.items()))


def write_unreadable(file: Path, bad: Mapping[str, str]) -> None:
    """A CSV of unreadable files (path, reason): skipped_images.csv and predict's unreadable.csv."""
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "reason"), *sorted(bad.items())])
