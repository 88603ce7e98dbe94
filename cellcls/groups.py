"""`python -m cellcls.groups [data.split=TRAIN] [against=TEST]`: source-cell groups and leaks.

Writes `groups.csv` (`path,group`), `groups.png` (a few groups as rows of thumbnails, to check
by eye) and `groups.json` (the counts printed) into the run folder. With `against=FOLDER`, both
folders are grouped together and the images of `data.split` that share a group with an image
of FOLDER are counted: near-duplicates across the two. Grouping the training folder also
counts how many validation images a random split would leak.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from cellcls.data.datamodule import ImageFolderDataModule
from cellcls.data.matching import write_groups_csv
from cellcls.data.splits import grouped_split, random_indices, shared_groups
from cellcls.reports.plots import plot_groups
from cellcls.run.cli import entry

log = logging.getLogger(__name__)


def summarize(groups: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Group counts: overall, per class (by the class most of a group's images carry), and
    the groups that span several class folders (one cell under two labels)."""
    by_group: dict[int, Counter] = {}
    for g, c in zip(groups.tolist(), classes, strict=True):
        by_group.setdefault(g, Counter())[c] += 1
    sizes = {g: sum(n.values()) for g, n in by_group.items()}
    per_class: dict[str, Any] = {}
    for c in sorted(set(classes)):
        mine = sorted(sizes[g] for g, n in by_group.items() if n.most_common(1)[0][0] == c)
        per_class[c] = {
            "groups": len(mine),
            "images": classes.count(c),
            "size_min": mine[0] if mine else 0,
            "size_median": float(np.median(mine)) if mine else 0.0,
            "size_max": mine[-1] if mine else 0,
            "singletons": mine.count(1),
        }
    return {
        "images": len(groups),
        "groups": len(by_group),
        "singletons": sum(1 for n in sizes.values() if n == 1),
        "per_class": per_class,
        "mixed": {str(g): dict(n) for g, n in by_group.items() if len(n) > 1},
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"{s['images']} images in {s['groups']} source groups, {s['singletons']} of one image",
        f"{'class':<12} {'groups':>6} {'images':>7} {'size min':>8} {'median':>7} {'max':>5}",
    ]
    for c, n in s["per_class"].items():
        lines.append(
            f"{c:<12} {n['groups']:>6} {n['images']:>7} {n['size_min']:>8} "
            f"{n['size_median']:>7.0f} {n['size_max']:>5}"
        )
    for g, n in s["mixed"].items():
        lines.append(f"group {g} spans class folders {n}: one cell under two labels?")
    return "\n".join(lines)


def validation_leaks(groups: np.ndarray, labels: list[int], fraction: float, seed: int) -> dict:
    """Validation images that share a source group with a training image, for both splits."""
    random_train, random_val = random_indices(len(groups), fraction, seed)
    grouped_train, grouped_val = grouped_split(groups, labels, fraction, seed)
    return {
        "random": {
            "val_images": len(random_val),
            "sharing_a_group_with_train": shared_groups(groups, random_train, random_val),
        },
        "grouped": {
            "val_images": len(grouped_val),
            "sharing_a_group_with_train": shared_groups(groups, grouped_train, grouped_val),
        },
    }


def report(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Group `data.split` (and compare it with `against`); write the files; return the counts."""
    dm: ImageFolderDataModule = instantiate(cfg.data, _convert_="object")
    dm.prepare_data()  # generated data is written on first use
    split = cfg.data.split
    groups = dm.source_groups(split, write=True)
    paths, ids = list(groups), np.array(list(groups.values()))
    classes = [Path(p).parent.name for p in paths]
    out.mkdir(parents=True, exist_ok=True)
    write_groups_csv(out / "groups.csv", paths, ids)
    plot_groups(paths, ids, classes, out / "groups.png", rows=cfg.show, seed=cfg.seed)
    result: dict[str, Any] = {"split": split, "root": str(dm.root), **summarize(ids, classes)}
    log.info("Source groups of %s (%s):\n%s", split, out / "groups.csv", format_summary(result))

    if split == dm.hparams.train_split:
        labels = [dm.classes.index(c) for c in classes]
        hp = dm.hparams
        leaks = result["validation"] = validation_leaks(ids, labels, hp.val_fraction, hp.seed)
        log.info(
            "Validation (%.0f%% of %s, seed %d): a random split puts %d of its %d images in a "
            "group with a training image; the grouped split %d of %d.",
            100 * hp.val_fraction,
            split,
            hp.seed,
            leaks["random"]["sharing_a_group_with_train"],
            leaks["random"]["val_images"],
            leaks["grouped"]["sharing_a_group_with_train"],
            leaks["grouped"]["val_images"],
        )
    if cfg.get("against"):
        other = cfg.against
        both = dm.source_groups(split, other, write=True)
        union = np.array(list(both.values()))
        mine = np.arange(len(groups))
        theirs = np.arange(len(groups), len(union))
        result["against"] = {
            "folder": other,
            f"{split}_images_with_a_duplicate_in_{other}": shared_groups(union, theirs, mine),
            f"{other}_images_with_a_duplicate_in_{split}": shared_groups(union, mine, theirs),
            "shared_groups": len(set(union[mine]) & set(union[theirs])),
        }
        log.info(
            "%d of %d %s images have a near-duplicate (same source cell or field) in %s; "
            "%d of %d %s images have one in %s.",
            result["against"][f"{split}_images_with_a_duplicate_in_{other}"],
            len(mine),
            split,
            other,
            result["against"][f"{other}_images_with_a_duplicate_in_{split}"],
            len(theirs),
            other,
            split,
        )
    (out / "groups.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


@entry("groups")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    report(cfg, out)


if __name__ == "__main__":
    main()
