"""Opening a user's image file: the one guarded door every reader goes through.

The decoder, the source-cell matching, the statistics, predict, the checks and the plots all
open images with `open_image`. It reads the header only (PIL opens lazily) and refuses, before a
single pixel is decoded, an empty file, a file in no known image format, and an image of more
than `MAX_PIXELS`: a 16000x16000 PNG of a few MB decodes to 768 MB, and the keypoint matching of
it took 5.8 GB. `ImageRefused` says why in words.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# PIL's own decompression-bomb threshold (it warns above it and refuses twice as much): about
# 9,459 x 9,459 pixels, 270 MB decoded. A 320x240 cell image is 0.08 megapixels, a 640x480
# slide 0.3.
MAX_PIXELS = 89_478_485


class ImageRefused(ValueError):
    """An image file that is not decoded: the message is the reason, without the path."""


def too_large(pixels: int) -> ImageRefused:
    return ImageRefused(
        f"{pixels / 1e6:.0f} megapixels, over the limit of {MAX_PIXELS / 1e6:.1f} "
        "(a decompression bomb, or an image to shrink or tile first): not decoded"
    )


@contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """The image at `path`, opened but not decoded (`im.size` and `im.mode` are known); raises
    `ImageRefused` for an empty file, a non-image or an oversized image, and `OSError` for a
    file that cannot be read at all."""
    if os.path.getsize(path) == 0:
        raise ImageRefused("empty file (0 bytes)")
    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        raise ImageRefused("not an image (no known image format)") from None
    except Image.DecompressionBombError as err:  # PIL's own refusal, at twice MAX_PIXELS
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        raise too_large(int(pixels[1]) if pixels else 2 * MAX_PIXELS) from None
    with im:
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise too_large(width * height)
        yield im
