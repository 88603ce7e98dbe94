"""Deterministic synthetic stand-in for the Kaggle "Blood Cell Images" dataset.

Tests and offline demos need images in the real folder layout without the real
data, so this draws a field of red blood cells plus one stained white cell whose
nucleus and granules follow its class. Cues are real but deliberately noisy
(overlapping sizes, jittered stains, blur, noise) so a small CNN has to learn.

Like Kaggle's set, images are copies of fewer source cells: each drawn field is saved once as
it is and then as augmented copies (rotation, shift, shear, flips, black fill, brightness), so a
random split puts one cell on both sides. `sources.csv` records every image's source cell and
where its white cell is, so tests of grouping and cropping know the answer.

Over 300 lines: one generator, whose drawing steps share its constants and random stream.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from tqdm import tqdm

Color = tuple[int, int, int]

CLASSES: tuple[str, ...] = ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")
IMAGE_SIZE: tuple[int, int] = (320, 240)  # width, height, as the real data
SPLITS: dict[str, int] = {"TRAIN": 0, "TEST": 1}  # split_id seeds each split apart

# Difficulty knobs: widen the ranges / jitters for a harder task, narrow them for an easier
# one. Lengths are in pixels at 240 px image height and scale with `size`.
WBC_RADIUS: dict[str, tuple[float, float]] = {  # overlapping on purpose
    "EOSINOPHIL": (27.0, 39.0),
    "LYMPHOCYTE": (20.0, 31.0),
    "MONOCYTE": (35.0, 50.0),
    "NEUTROPHIL": (27.0, 40.0),
}
RBC_RADIUS = (20.0, 27.0)
RBC_COUNT = (10, 28)
RBC_SPOTS = 4  # small darker or paler spots per red cell
PLATELETS = (2, 8)  # small purple fragments: texture for matching, and decoys for cropping
MOTTLE = 6.0  # amplitude of the smear's low-frequency unevenness, 0-255 scale
STAIN_JITTER = 15.0  # +- per channel on nucleus / cytoplasm / granule colours
COLOR_GAIN = (0.95, 1.05)  # per-channel multiplicative colour cast of the whole image
BRIGHTNESS = (-10.0, 10.0)  # additive brightness offset
BLUR_RADIUS = (0.5, 1.5)  # Gaussian blur radius in pixels
NOISE_STD = (2.0, 7.0)  # additive (uniform) pixel noise std, 0-255 scale
WBC_CENTER = (0.35, 0.65)  # WBC centre range, as a fraction of width / height
JPEG_QUALITY = 90
# Augmented copies, as Keras' ImageDataGenerator made Kaggle's: rotation in degrees, shift as a
# fraction of width/height, shear angle in radians, brightness gain; flips and black fill.
ROTATION, SHIFT, SHEAR, GAIN = 20.0, 0.1, 0.2, (0.93, 1.07)
SOURCES_CSV = "sources.csv"
CYTOPLASM: dict[str, Color] = {  # base colours before STAIN_JITTER
    "EOSINOPHIL": (220, 160, 170),
    "LYMPHOCYTE": (150, 165, 220),
    "MONOCYTE": (180, 180, 215),
    "NEUTROPHIL": (215, 190, 220),
}
NUCLEUS: dict[str, Color] = {  # one purple stain; lymphocytes denser, monocytes paler
    "EOSINOPHIL": (125, 75, 175),
    "LYMPHOCYTE": (100, 55, 160),
    "MONOCYTE": (145, 100, 195),
    "NEUTROPHIL": (125, 75, 175),
}


def _jitter(rng: np.random.Generator, base: Color, amount: float = STAIN_JITTER) -> Color:
    """Shift a colour per channel so no single hue identifies a class."""
    c = np.asarray(base) + rng.uniform(-amount, amount, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _disc(
    draw: ImageDraw.ImageDraw, x: float, y: float, rx: float, ry: float, fill: int | tuple[int, ...]
) -> None:
    """Axis-aligned ellipse by centre and radii (ImageDraw wants a bounding box)."""
    draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=fill)


def _draw_rbcs(img: Image.Image, rng: np.random.Generator, s: float) -> None:
    """Semi-transparent pink discs with a paler centre; overlaps darken like real smears."""
    w, h = img.size
    draw = ImageDraw.Draw(img, "RGBA")
    n = int(rng.integers(*RBC_COUNT, endpoint=True))
    # all random draws at once (vectorised: per-call RNG overhead dominates otherwise)
    xs, ys = rng.uniform(-10 * s, w + 10 * s, n), rng.uniform(-10 * s, h + 10 * s, n)
    r = rng.uniform(*RBC_RADIUS, n) * s
    rxs, rys = r * rng.uniform(0.88, 1.0, n), r * rng.uniform(0.88, 1.0, n)
    bodies = np.asarray(_jitter(rng, (205, 150, 155), 10)) + rng.uniform(-8, 8, (n, 3))
    ks = rng.uniform(0.3, 0.5, n)
    # a few small spots per cell, as real red cells show: every field gets its own texture
    spots = rng.uniform(-0.75, 0.75, (n, RBC_SPOTS, 2))
    shades = rng.choice([-40, 30], (n, RBC_SPOTS))
    for x, y, rx, ry, body, k, xy, shade in zip(
        xs, ys, rxs, rys, bodies, ks, spots, shades, strict=True
    ):
        rim, fill, pale = (tuple(int(v) for v in np.clip(body + d, 0, 255)) for d in (-25, 0, 25))
        _disc(draw, x, y, rx, ry, (*rim, 200))
        _disc(draw, x, y, rx - 2.5 * s, ry - 2.5 * s, (*fill, 200))
        _disc(draw, x, y, rx * k, ry * k, (*pale, 170))
        for (dx, dy), d in zip(xy, shade, strict=True):
            spot = tuple(int(v) for v in np.clip(body + d, 0, 255))
            _disc(draw, x + dx * rx, y + dy * ry, 1.8 * s, 1.8 * s, (*spot, 160))


def _draw_field_texture(img: Image.Image, rng: np.random.Generator, s: float) -> Image.Image:
    """An uneven smear (low-frequency brightness) and platelets: the texture by which copies of
    one field are recognised, as in real smears, where the white cell is one object of many."""
    w, h = img.size
    coarse = rng.normal(0, MOTTLE, (h // 16 + 2, w // 16 + 2)) + 128
    mottle = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC
    )
    img = ImageChops.add(img, mottle.convert("RGB"), offset=-128)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(*PLATELETS, endpoint=True))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        colour = _jitter(rng, (150, 100, 190), 20)
        for dx, dy, r in zip(
            *rng.normal(0, 2.5 * s, (2, 3)), rng.uniform(1.5, 3.5, 3) * s, strict=True
        ):
            _disc(draw, x + dx, y + dy, r, r * rng.uniform(0.6, 1.0), colour)
    return img


def _nucleus_mask(label: str, size: int, r: float, rng: np.random.Generator) -> Image.Image:
    """Class-specific nucleus shape as a mask: shape is the main cue, since all classes
    share one (jittered) purple stain."""
    mask = Image.new("L", (size, size), 0)
    d, c = ImageDraw.Draw(mask), size / 2
    if label == "LYMPHOCYTE":  # large round nucleus, thin cytoplasm rim
        k = rng.uniform(0.72, 0.9)
        dx, dy = rng.uniform(-0.08, 0.08, 2) * r
        _disc(d, c + dx, c + dy, r * k * rng.uniform(0.9, 1.0), r * k, 255)
    elif label == "MONOCYTE":  # big ellipse with a bite out of one side: kidney / bean
        k = rng.uniform(0.52, 0.68)
        _disc(d, c, c, r * k * rng.uniform(1.0, 1.2), r * k, 255)
        bite = rng.uniform(0.22, 0.38) * r
        _disc(d, c, c - r * k - bite * rng.uniform(0.2, 0.7), bite * 1.5, bite * 1.1, 0)
    else:  # segmented: lobes along an arc joined by thin bridges
        n = 2 if label == "EOSINOPHIL" else int(rng.integers(3, 5, endpoint=True))
        arc_r = r * rng.uniform(0.4, 0.55)
        span = rng.uniform(2.0, 3.2) if n > 2 else rng.uniform(1.6, 2.4)
        angles = np.linspace(-span / 2, span / 2, n) + rng.normal(0, 0.15, n)
        lobe_k = rng.uniform(0.3, 0.38) if n == 2 else rng.uniform(0.2, 0.28)
        pts = [(c + arc_r * math.sin(a), c + arc_r * (0.4 - math.cos(a))) for a in angles]
        d.line(pts, fill=255, width=max(1, int(r * rng.uniform(0.1, 0.18))))
        for x, y in pts:
            lr = lobe_k * r * rng.uniform(0.85, 1.15)
            _disc(d, x, y, lr * rng.uniform(0.8, 1.1), lr, 255)
    return mask


def _draw_wbc(label: str, rng: np.random.Generator, s: float) -> Image.Image:
    """One white cell on a transparent square patch, rotated at random."""
    r = rng.uniform(*WBC_RADIUS[label]) * s
    size = int(2 * r + 6)
    c = size / 2
    patch = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(patch)
    cyto = _jitter(rng, CYTOPLASM[label])
    _disc(d, c, c, r, r * rng.uniform(0.9, 1.0), cyto)
    if label == "EOSINOPHIL":  # coarse orange-red granules across the cytoplasm
        gran = _jitter(rng, (215, 110, 95))
        n = int(rng.integers(90, 170) * s * s)
        rad, ang = r * np.sqrt(rng.uniform(0, 0.9, n)), rng.uniform(0, 2 * math.pi, n)
        for gx, gy in zip(c + rad * np.cos(ang), c + rad * np.sin(ang), strict=True):
            _disc(d, gx, gy, 2.2 * s, 2.2 * s, gran)
    elif label == "MONOCYTE":  # a few pale vacuoles
        for _ in range(int(rng.integers(0, 5))):
            a, rad = rng.uniform(0, 2 * math.pi), r * rng.uniform(0.5, 0.85)
            vr = rng.uniform(1.5, 3.5) * s
            _disc(d, c + rad * math.cos(a), c + rad * math.sin(a), vr, vr, (225, 225, 240))
    nucleus = _nucleus_mask(label, size, r, rng)
    purple = _jitter(rng, NUCLEUS[label])
    patch.paste(purple, mask=nucleus)
    # chromatin texture: darker clumps, kept inside the nucleus
    clumps = Image.new("L", (size, size), 0)
    dc = ImageDraw.Draw(clumps)
    n = int(30 * s * s)
    xs, ys = rng.uniform(c - r, c + r, (2, n))
    for x, y, cr in zip(xs, ys, rng.uniform(1.0, 2.5, n) * s, strict=True):
        _disc(dc, x, y, cr, cr, 150)
    patch.paste(tuple(max(v - 45, 0) for v in purple), mask=ImageChops.multiply(clumps, nucleus))
    return patch.rotate(rng.uniform(0, 360), resample=Image.Resampling.BILINEAR)


def render_cell(
    label: str, rng: np.random.Generator, size: tuple[int, int] = IMAGE_SIZE
) -> tuple[Image.Image, tuple[float, float, float]]:
    """One RGB image of class `label`: RBC field, one WBC, then blur, colour cast and noise.

    Returns the image and its white cell's centre and radius in pixels.
    """
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASSES}")
    w, h = size
    s = h / IMAGE_SIZE[1]
    img = Image.new("RGB", size, _jitter(rng, (224, 218, 214), 6))
    _draw_rbcs(img, rng, s)
    img = _draw_field_texture(img, rng, s)
    wbc = _draw_wbc(label, rng, s)
    pw = wbc.size[0]
    x = int(rng.uniform(*WBC_CENTER) * w) - pw // 2
    y = int(rng.uniform(*WBC_CENTER) * h) - pw // 2
    img.paste(wbc, (x, y), wbc)
    cell = (x + pw / 2, y + pw / 2, (pw - 6) / 2)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(*BLUR_RADIUS)))
    # colour cast + brightness as a per-channel lookup table (cheaper than numpy broadcasting)
    lut = np.arange(256)[None, :] * rng.uniform(*COLOR_GAIN, (3, 1)) + rng.uniform(*BRIGHTNESS)
    img = img.point(np.clip(lut, 0, 255).astype(int).ravel().tolist())
    # uniform noise with the requested std: ~5x cheaper to draw than Gaussian
    noise = rng.random((h, w, 3), dtype=np.float32) - np.float32(0.5)
    noise *= np.float32(rng.uniform(*NOISE_STD) * math.sqrt(12))
    noise += np.asarray(img, dtype=np.float32)
    return Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), "RGB"), cell


def augment(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """A random affine copy of `img` with black fill; returns it and its 2x3 forward map."""
    w, h = img.size
    theta = math.radians(rng.uniform(-ROTATION, ROTATION))
    shear = rng.uniform(-SHEAR, SHEAR)
    fx, fy = rng.choice([-1.0, 1.0], 2)
    tx, ty = rng.uniform(-SHIFT, SHIFT) * w, rng.uniform(-SHIFT, SHIFT) * h
    cos, sin = math.cos(theta), math.sin(theta)
    # about the centre: flip, then shear, then rotate, then shift
    linear = np.array([[cos, -sin], [sin, cos]]) @ np.array(
        [[1, -math.sin(shear)], [0, math.cos(shear)]]
    )
    linear = linear @ np.diag([fx, fy])
    centre = np.array([w / 2, h / 2])
    forward = np.hstack([linear, (centre + (tx, ty) - linear @ centre)[:, None]])
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]  # PIL maps output -> input
    out = img.transform(
        img.size,
        Image.Transform.AFFINE,
        inverse.ravel().tolist(),
        resample=Image.Resampling.BILINEAR,
        fillcolor=(0, 0, 0),
    )
    gain = rng.uniform(*GAIN)
    return out.point(lambda v: min(255, int(v * gain))), forward


def generate_dataset(
    root: str | Path,
    n_train: int = 200,
    n_test: int = 50,
    seed: int = 0,
    size: tuple[int, int] = IMAGE_SIZE,
    progress: bool = True,
    copies: int = 1,
) -> Path:
    """Write n_train and n_test images PER CLASS under root/TRAIN and root/TEST; return root.

    Every `copies` images of a class are one source cell: the first as drawn, the others
    augmented (see `augment`). `root/sources.csv` lists each image (`path` relative to root),
    its `source` and its white cell (`wbc_x`, `wbc_y`, `wbc_r`, pixels).
    Each source has its own RNG keyed on (seed, split, class, index), so a file does not
    depend on the split sizes. Writing goes to a temp sibling renamed at the end, so an
    interrupted run never leaves a half-written `root`; if `root` appeared meanwhile
    (a concurrent run won), that copy is kept.
    """
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = [
        (split, cid, source, min(copies, n - source * copies))
        for split, n in (("TRAIN", n_train), ("TEST", n_test))
        for cid in range(len(CLASSES))
        for source in range(math.ceil(n / copies))
    ]
    rows = []
    try:
        for split in SPLITS:
            for label in CLASSES:
                (tmp / split / label).mkdir(parents=True)
        bar = tqdm(jobs, desc="generating synthetic blood cells", disable=not progress)
        for split, cid, source, n_copies in bar:
            key = [seed, SPLITS[split], cid, source]
            img, (x, y, r) = render_cell(CLASSES[cid], np.random.default_rng(key), size)
            folder = f"{split}/{CLASSES[cid]}"
            for k in range(n_copies):
                out, (cx, cy) = img, (x, y)
                if k:
                    out, forward = augment(img, np.random.default_rng([*key, k]))
                    cx, cy = forward @ (x, y, 1)
                out.save(tmp / folder / f"{source}_{k}.jpeg", "JPEG", quality=JPEG_QUALITY)
                rows.append(
                    (f"{folder}/{source}_{k}.jpeg", f"{folder}/{source}", *np.round((cx, cy, r), 1))
                )
        with (tmp / SOURCES_CSV).open("w", newline="") as f:
            csv.writer(f).writerows([("path", "source", "wbc_x", "wbc_y", "wbc_r"), *rows])
        if not root.exists():
            try:
                os.rename(tmp, root)
            except OSError:
                if not root.exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def read_sources(root: str | Path) -> list[dict[str, str]]:
    """The rows of a generated dataset's sources.csv (see `generate_dataset`)."""
    with (Path(root) / SOURCES_CSV).open(newline="") as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m cellcls.data.generate OUT [--train N] [--test N] [--copies K] [--seed S]."""
    parser = argparse.ArgumentParser(description="Generate a synthetic blood-cell dataset.")
    parser.add_argument("out", type=Path, help="output root (gets TRAIN/ and TEST/)")
    parser.add_argument("--train", type=int, default=200, help="train images per class")
    parser.add_argument("--test", type=int, default=50, help="test images per class")
    parser.add_argument("--copies", type=int, default=5, help="images per source cell")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(generate_dataset(args.out, args.train, args.test, args.seed, copies=args.copies))


if __name__ == "__main__":
    main()
