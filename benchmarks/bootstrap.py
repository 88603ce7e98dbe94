"""Time the cluster bootstrap on a TEST-sized input: 2,487 images of 71 source cells, 4 classes.

    python benchmarks/bootstrap.py

Prints the seconds of one `cluster_bootstrap` and one `paired_bootstrap` (2,000 resamples each,
best of 5) and the CPU. The target is under 2 s on a 2-core CPU (docs/intervals.md).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from cellcls.reports.intervals import cluster_bootstrap, paired_bootstrap


def sized_like_test(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(correct, labels, groups) of 2,487 images of 71 groups, each group of one of 4 classes."""
    rng = np.random.default_rng(seed)
    group_class = np.arange(71) % 4
    groups = np.sort(rng.integers(0, 71, 2487))
    labels = group_class[groups]
    correct = rng.random(2487) < 0.85
    return correct, labels, groups


def best_of(repeats: int, fn, *args) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo, else what platform knows)."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    correct, labels, groups = sized_like_test()
    other = correct ^ (np.random.default_rng(1).random(len(correct)) < 0.05)
    single = best_of(5, cluster_bootstrap, correct, labels, groups)
    paired = best_of(5, paired_bootstrap, correct, other, labels, groups)
    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores visible")
    print(f"cluster_bootstrap, 2000 resamples, 2487 images, 71 groups: {single:.4f} s")
    print(f"paired_bootstrap,  2000 resamples, 2487 images, 71 groups: {paired:.4f} s")


if __name__ == "__main__":
    main()
