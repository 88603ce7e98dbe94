"""Source-cell matching: which images of a folder show the same cell, so validation can hold it out.

Kaggle's TRAIN holds ~35 rotated, shifted, sheared and flipped copies of each of ~280 cells, so a
random split puts copies of one cell on both sides and `val/acc` measures recognition, not
classification. Two images are linked when their ORB keypoints match under a RANSAC affine fit
(the mirror image included: ORB is rotation- but not mirror-invariant); a group is a connected
component, so fields that overlap end up in one group too.

Matching all pairs would be O(N²) (50 million pairs for TRAIN). Instead each image is matched
against the nearest images by a hue-saturation histogram (cheap, and blind to rotation, flips and
brightness), and then every group against the groups nearest to it, until nothing merges.
OpenCV (opencv-python-headless) does the keypoints, Hamming matching and RANSAC in C++ with the
GIL released, so a thread pool uses every core; it is the standard, well-kept library for this.

Over 300 lines: one algorithm, whose tuned constants sit beside the steps that use them.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from cellcls.core.images import open_image
from cellcls.data.decode import cpu_count, to_rgb8
from cellcls.data.store import cache_key

log = logging.getLogger(__name__)

# Bumped whenever the method or its settings change, so cached groups are recomputed.
VERSION = "v2"  # v2: images read as training reads them (PIL, any mode to 8-bit RGB)
KEYPOINTS = 300  # ORB keypoints per image (and as many on its mirror image)
SPREAD_SHARE = 1.0  # share of the keypoints spread evenly over a 4x4 grid, the rest strongest
FAST_THRESHOLD = 5  # low: the smooth, blurred fields give few corners at ORB's default 20
RATIO = 0.8  # Lowe's ratio test on Hamming distances
MIN_INLIERS = 16  # same cell: 30-300 affine inliers (1% below 20); unrelated: at most 11
# The inliers must spread over the field (median distance from their median point, as a fraction
# of the image's shorter side): two similar nuclei can match each other, two fields cannot.
# Copies of one cell: 1% of pairs below 0.09; a nucleus-only match: about 0.05.
MIN_SPREAD = 0.08
NEIGHBOURS = 20  # histogram neighbours matched per image
GROUP_NEIGHBOURS = 30  # nearest groups each group is matched against, per round
DARK = 25  # pixels darker than this in every channel are an augmentation's constant fill


@dataclass
class Keypoints:
    """ORB keypoints of one image: positions (n x 2, float32), descriptors (n x 32, uint8) and
    the image's shorter side in pixels."""

    points: np.ndarray
    desc: np.ndarray
    side: int

    @classmethod
    def detect(cls, orb: cv2.ORB, gray: np.ndarray, mask: np.ndarray) -> Keypoints:
        """The strongest corners of every cell of a 4x4 grid, so that the field as a whole, not
        its highest-contrast object (the nucleus), decides whether two images match."""
        h, w = gray.shape
        kps = orb.detect(gray, mask)
        xy = np.array([k.pt for k in kps], dtype=np.float32).reshape(-1, 2)
        order = np.argsort([-k.response for k in kps], kind="stable")
        cell = (xy[order, 1] * 4 // h * 4 + xy[order, 0] * 4 // w).astype(int)
        rank = np.zeros(len(order), int)  # rank of each keypoint within its grid cell
        for c in np.unique(cell):
            rank[cell == c] = np.arange(np.sum(cell == c))
        # the best few of every cell first, then the strongest of the rest
        quota = int(KEYPOINTS * SPREAD_SHARE) // 16
        order = order[np.argsort(rank >= quota, kind="stable")][:KEYPOINTS]
        kps, desc = orb.compute(gray, [kps[i] for i in order])
        points = np.array([k.pt for k in kps], dtype=np.float32).reshape(-1, 2)
        desc = desc if desc is not None else np.zeros((0, 32), np.uint8)
        return cls(points, desc, min(gray.shape))


@dataclass
class Features:
    """What matching needs of one image: its colour histogram and keypoints, as is and mirrored."""

    hist: np.ndarray
    keypoints: Keypoints
    mirrored: Keypoints


def features(path: str | Path) -> Features:
    """Histogram and keypoints of one image file, ignoring the black fill of augmentations."""
    with open_image(path) as im:  # refused undecoded when oversized (not cv2.imread)
        image = cv2.cvtColor(np.asarray(to_rgb8(im)), cv2.COLOR_RGB2BGR)
    valid = (image.max(axis=2) > DARK).astype(np.uint8)
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1], valid, [16, 16], [0, 180, 0, 256]).ravel()
    hist = np.sqrt(hist / max(hist.sum(), 1.0))  # Hellinger: cosine of square roots
    # Keep keypoints off the fill's edge: its corners would match between unrelated images.
    mask = cv2.erode(valid * 255, np.ones((9, 9), np.uint8))
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    orb = cv2.ORB_create(4 * KEYPOINTS, fastThreshold=FAST_THRESHOLD)
    return Features(
        hist.astype(np.float32),
        Keypoints.detect(orb, gray, mask),
        Keypoints.detect(orb, cv2.flip(gray, 1), cv2.flip(mask, 1)),
    )


def inliers(a: Keypoints, b: Keypoints) -> int:
    """Keypoint matches of `a` in `b` consistent with one affine map; 0 if there is none."""
    if len(a.desc) < 6 or len(b.desc) < 2:
        return 0
    dist, idx = cv2.batchDistance(a.desc, b.desc, cv2.CV_32S, normType=cv2.NORM_HAMMING, K=2)
    good = np.flatnonzero(dist[:, 0] < RATIO * dist[:, 1])
    if len(good) < 6:
        return 0
    affine, mask = cv2.estimateAffine2D(
        a.points[good], b.points[idx[good, 0]], ransacReprojThreshold=4.0
    )
    if affine is None or not 0.5 < abs(np.linalg.det(affine[:, :2])) < 2.0:
        return 0  # augmentations zoom a little, never 2x
    matched = a.points[good][mask.ravel() > 0]
    spread = np.median(np.linalg.norm(matched - np.median(matched, axis=0), axis=1))
    return len(matched) if spread >= MIN_SPREAD * a.side else 0


def same_source(a: Features, b: Features) -> int:
    """The affine inliers between two images, mirror included (the higher of the two)."""
    direct = inliers(a.keypoints, b.keypoints)
    return direct if direct >= MIN_INLIERS else max(direct, inliers(a.keypoints, b.mirrored))


class UnionFind:
    """Disjoint sets over 0..n-1: the groups so far."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> bool:
        ri, rj = self.find(i), self.find(j)
        if ri == rj:
            return False
        self.parent[max(ri, rj)] = min(ri, rj)
        return True

    def labels(self) -> np.ndarray:
        """Group of every element, numbered 0, 1, ... in order of first appearance."""
        roots = [self.find(i) for i in range(len(self.parent))]
        first: dict[int, int] = {}
        return np.array([first.setdefault(r, len(first)) for r in roots])


def nearest_pairs(hist: np.ndarray, k: int) -> list[tuple[int, int]]:
    """Each image with its `k` most similar images by histogram, most similar pairs first."""
    n, k = len(hist), min(k, len(hist) - 1)
    pairs: dict[tuple[int, int], float] = {}
    for start in range(0, n, 1024):
        sim = hist[start : start + 1024] @ hist.T
        rows = np.arange(len(sim))
        sim[rows, start + rows] = -np.inf
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        for r, js in enumerate(top):
            for j in js:
                i, jj = start + r, int(j)
                pairs[(min(i, jj), max(i, jj))] = float(sim[r, j])
    return sorted(pairs, key=lambda p: -pairs[p])


def group_pairs(hist: np.ndarray, labels: np.ndarray, k: int) -> list[tuple[int, int]]:
    """Image pairs between every group and each of its `k` nearest groups.

    Groups are compared by their closest members (single linkage). Two pairs are tried: that
    closest pair, and the groups' typical members (the highest mean similarity within the
    group), which are rarely the cropped or distorted copies that fail to match. This joins
    pieces of one source that the image neighbours missed: copies with another brightness,
    another field of view of the same cell.
    """
    n_groups = labels.max() + 1
    members = [np.flatnonzero(labels == g) for g in range(n_groups)]
    typical = [idx[np.argmax((hist[idx] @ hist[idx].T).mean(axis=1))] for idx in members]
    pairs = set()
    for g, idx in enumerate(members):
        sim = hist[idx] @ hist.T  # |g| x N
        best = sim.max(axis=0)  # every image's similarity to group g
        best[idx] = -np.inf
        group_best = np.full(n_groups, -np.inf)
        np.maximum.at(group_best, labels, best)
        for h in np.argsort(-group_best)[: min(k, n_groups - 1)]:
            j = members[h][np.argmax(best[members[h]])]
            i = idx[np.argmax(sim[:, j])]
            for a, b in ((i, j), (typical[g], typical[h])):
                pairs.add((min(a, b), max(a, b)))
    return sorted(pairs)


def find_groups(paths: Sequence[str], progress: bool = True, desc: str = "grouping") -> np.ndarray:
    """The source group of every image in `paths` (0, 1, ... in order of first appearance).

    Files that cannot be read are groups of their own.
    """
    n = len(paths)
    if n == 0:
        return np.zeros(0, dtype=int)
    threads = cpu_count()
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one image per thread; OpenCV's own threads would oversubscribe
    try:
        with ThreadPoolExecutor(threads) as pool:
            feats = list(
                tqdm(
                    pool.map(_features_or_none, paths),
                    total=n,
                    desc=f"{desc}: keypoints",
                    unit="img",
                    disable=not progress,
                )
            )
            groups = UnionFind(n)
            hist = np.zeros((n, 256), np.float32)  # unreadable files: all zeros
            for i, f in enumerate(feats):
                if f is not None:
                    hist[i] = f.hist
            tested: set[tuple[int, int]] = set()

            def verify(pairs: Iterable[tuple[int, int]], bar: tqdm | None = None) -> int:
                """Match the pairs not yet in one group; link those that match. Chunks let
                later pairs skip work that earlier links made pointless."""
                todo_all = [p for p in pairs if p not in tested]
                merged = 0
                for start in range(0, len(todo_all), 2048):
                    chunk = todo_all[start : start + 2048]
                    todo = [
                        (i, j)
                        for i, j in chunk
                        if feats[i] is not None
                        and feats[j] is not None
                        and groups.find(i) != groups.find(j)
                    ]
                    tested.update(chunk)
                    scores = pool.map(lambda p: same_source(feats[p[0]], feats[p[1]]), todo)
                    for (i, j), score in zip(todo, scores, strict=True):
                        if score >= MIN_INLIERS:
                            merged += groups.union(i, j)
                    if bar is not None:
                        bar.update(len(chunk))
                return merged

            pairs = nearest_pairs(hist, NEIGHBOURS)
            with tqdm(
                total=len(pairs), desc=f"{desc}: matching", unit="pair", disable=not progress
            ) as bar:
                verify(pairs, bar)
            while verify(group_pairs(hist, groups.labels(), GROUP_NEIGHBOURS)):
                pass
    finally:
        cv2.setNumThreads(previous)
    return groups.labels()


def _features_or_none(path: str) -> Features | None:
    try:
        return features(path)
    except Exception as err:  # an unreadable file is its own group, never a crash
        log.warning("Cannot read '%s' for grouping (%s); it is a group of its own.", path, err)
        return None


def load_groups(
    paths: Sequence[str],
    cache_dir: str | Path | None,
    name: str = "images",
    progress: bool = True,
    write: bool = True,
) -> np.ndarray:
    """`find_groups(paths)`, read from `cache_dir` when computed before (beside the
    decoded-image stores, keyed like them by the files' paths, sizes and modification times),
    and with `write` kept there once computed."""
    file = None
    if cache_dir is not None:
        file = Path(cache_dir) / f"groups-{VERSION}-{name}-{cache_key(paths, 0)}.csv"
        if file.exists():
            groups = read_groups_csv(file)
            if list(groups) == list(paths):
                return np.array(list(groups.values()))
            log.warning("Ignoring %s: it does not list these images.", file)
    labels = find_groups(paths, progress, desc=f"grouping {name}")
    if file is not None and write:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        write_groups_csv(tmp, paths, labels)
        tmp.replace(file)
        log.info("Source groups cached: %s", file)
    return labels


def write_groups_csv(file: str | Path, paths: Sequence[str], labels: Sequence[int]) -> None:
    """`path,group`: one row per image."""
    with Path(file).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "group"])
        writer.writerows(zip(paths, map(int, labels), strict=True))


def read_groups_csv(file: str | Path) -> dict[str, int]:
    """path -> group, as `write_groups_csv` wrote them."""
    with Path(file).open(newline="") as f:
        return {row["path"]: int(row["group"]) for row in csv.DictReader(f)}
