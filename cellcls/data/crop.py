"""Find the white cell in a blood-smear image and cut a square around it.

The white cell fills about a tenth of a 320x240 image (and of a 640x480 slide of the same smear:
the sizes here follow the image's); the rest is red cells, which carry no
label. Its nucleus is the only large dark-purple region (Wright/Giemsa stain): in OpenCV's HSV
units, hue 115-160 and saturation above 80. Platelets are purple too but small, and the black
borders that augmentation leaves have no saturation, so the largest purple region (after a
closing that joins the lobes of a neutrophil's nucleus) is the white cell.
"""

from __future__ import annotations

import cv2
import numpy as np

# Nucleus stain in OpenCV HSV units (hue 0-180): purple, saturated, not black.
HUE = (115, 160)
MIN_SATURATION = 80
MIN_VALUE = 30
# A nucleus smaller than this share of the image is noise (a platelet, a speck of stain).
MIN_AREA = 0.002
# The closing that joins a nucleus's lobes: 9 px on a 240-px-high image, scaled with the image.
CLOSING_PX, CLOSING_AT = 9, 240


def stain_mask(rgb: np.ndarray) -> np.ndarray:
    """uint8 mask (0/255) of the nucleus-coloured pixels of an RGB image."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    low = (HUE[0], MIN_SATURATION + 1, MIN_VALUE)
    mask = cv2.inRange(hsv, low, (HUE[1], 255, 255))
    k = max(3, round(CLOSING_PX * min(rgb.shape[:2]) / CLOSING_AT) | 1)  # odd
    closing = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    return cv2.morphologyEx(mask, cv2.MORPH_CLOSE, closing)


def find_cell(rgb: np.ndarray) -> tuple[float, float] | None:
    """Centre (x, y) in pixels of the largest stained region, or None if there is none."""
    n, _, stats, centroids = cv2.connectedComponentsWithStats(stain_mask(rgb), connectivity=8)
    if n < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[largest, cv2.CC_STAT_AREA] < MIN_AREA * rgb.shape[0] * rgb.shape[1]:
        return None
    x, y = centroids[largest]
    return float(x), float(y)


def square_box(
    centre: tuple[float, float] | None, side: int, width: int, height: int
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a `side`-pixel square centred on `centre` (the image's
    centre if None), moved inside the image; a side larger than the image is cut to it."""
    side = min(side, width, height)
    cx, cy = centre if centre is not None else (width / 2, height / 2)
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, left + side, top + side
