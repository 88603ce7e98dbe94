"""`python -m cellcls.ood [experiment=NAME] data.root=…`: how well the OOD flag's scores
(`cellcls.models.ood`) tell images unlike the training set from those like it, over cells.

Leave one class out: for each class in turn (`ood.leave_out`), the recipe trains on the others,
with grouped validation, as `cellcls.train` does (into `<run>/without_<CLASS>/`; a finished one
is kept, so an interrupted run resumes). Its calibrated checkpoint then scores
- for choosing (`selection`): its held-out validation cells against the left-out class's TRAIN
  images (cells no model of the run trained on) and against images that are no white-cell crop
  (`cellcls.data.outliers`: red-cell fields of half of Kaggle's original slides, generated
  cells, noise);
- for reporting (`test`): the other classes' TEST images against the left-out class's, and
  against the other half of the slides and other draws of the generated cells and noise.
Each AUROC carries its 95% interval over cells; at the flag's threshold (`ood.rate` of held-out
cells flagged) the share flagged on each side. The score with the best mean selection AUROC
(over every model and set) is `chosen`: TEST chooses nothing. Writes `ood_metrics.json`,
`ood.md` and `ood_auroc.png`.

`ood.checkpoint=PATH`: no training; that model's TEST against the non-cell images.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from cellcls.core.errors import CellclsError, is_level, require
from cellcls.cv import best_checkpoint
from cellcls.data.matching import read_groups_csv, write_groups_csv
from cellcls.data.outliers import noise, red_cell_fields, synthetic_cells
from cellcls.inference import Classifier, load_classifier
from cellcls.models.ood import SCORES
from cellcls.reports.metrics import interval
from cellcls.reports.ood import ood_threshold, separation
from cellcls.reports.plots import plot_ood
from cellcls.run.cli import entry
from cellcls.train import train

log = logging.getLogger(__name__)
DONE = "ood.json"  # in a left-out class's folder once its figures are final
Images = tuple[np.ndarray, np.ndarray, np.ndarray]  # images or paths, labels, groups


def outputs(clf: Classifier, images: np.ndarray | Sequence[str], batch: int = 256) -> dict:
    """`Classifier.outputs` of preprocessed images (N x size x size x 3) or of image files."""
    parts = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        if not isinstance(chunk, np.ndarray) or chunk.dtype != np.uint8:  # files
            cells = clf.cells(list(chunk))
            bad = [c for c in cells if isinstance(c, str)]
            if bad:
                raise CellclsError(f"cannot score an image: {bad[0]}")
            chunk = np.stack([c.image for c in cells])
        parts.append(clf.outputs(chunk))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def split_images(dm: Any, split: str, classes: Sequence[str], groups: dict[str, int]) -> Images:
    """The files of `split` in class folders `classes` (labels: their index in `classes`), and
    their source groups (`groups`: `groups_file`'s, by resolved path)."""
    rows = [
        (path, classes.index(Path(path).parent.name), groups[str(Path(path).resolve())])
        for path in dm.image_paths(split)
        if Path(path).parent.name in classes
    ]
    paths, labels, group = zip(*rows, strict=True) if rows else ((), (), ())
    return np.array(paths), np.array(labels), np.array(group)


def non_cell_sets(cfg: DictConfig, half: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The images that are no white-cell crop, as `ood.*` asks, at the model's input size: one
    `half` (0: for choosing, 1: for reporting) of the slides, and images drawn apart."""
    size, crop, o = int(cfg.data.image_size), cfg.data.get("crop"), cfg.ood
    seed = cfg.seed + half
    sets = {}
    if o.red_cells:
        images, slides = red_cell_fields(cfg.data.root, size, crop, seed=seed)
        keep = slides % 2 == half
        sets["red-cell fields"] = images[keep], slides[keep]
    if o.synthetic:
        sets["generated cells"] = synthetic_cells(int(o.synthetic), size, crop, seed=seed)
    if o.noise:
        sets["noise"] = noise(int(o.noise), size, seed=seed)
    return sets


def figures(
    clf: Classifier,
    rate: float,
    inside: Images,
    outside: dict[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, dict[str, Any]]:
    """Per outside set, per score: `separation` of its images from `inside`'s."""
    scored_in = outputs(clf, inside[0])
    rows: dict[str, dict[str, Any]] = {}
    for name, (images, groups) in outside.items():
        scored = outputs(clf, images)
        rows[name] = {
            s: separation(
                scored_in[s],
                inside[1],
                inside[2],
                scored[s],
                groups,
                ood_threshold(clf.trust["ood"], rate, s),
            )
            for s in SCORES
        }
    return rows


def leave_out(cfg: DictConfig, left: str, out: Path, sets: Sequence[dict]) -> dict[str, Any]:
    """Train without class `left` (unless done) and score what it never saw (module docstring)."""
    folder = out / f"without_{left}"
    done = folder / DONE
    if done.is_file():
        log.info("Without %s: done (%s), kept.", left, done)
        return json.loads(done.read_text())
    classes = [c for c in cfg.data.classes if c != left]
    run_cfg = copy.deepcopy(cfg)
    with open_dict(run_cfg):
        run_cfg.data.classes, run_cfg.data.ignore_classes = classes, [left]
        run_cfg.data.groups = str(groups_file(cfg, out))  # the cells all classes were grouped in
        run_cfg.paths.output_dir = str(folder)
        run_cfg.test, run_cfg.optimized_metric = False, None
        last = folder / "checkpoints" / "last.ckpt"
        run_cfg.ckpt_path = str(last) if last.is_file() else None
    log.info("Without %s: training on %s in %s", left, classes, folder)
    train(run_cfg)
    ckpt = best_checkpoint(folder)
    clf = load_classifier(ckpt)
    if not (clf.trust or {}).get("ood"):
        raise CellclsError(f"{ckpt} has no OOD evidence: cellcls.ood needs data.val_split=grouped")
    # The held-out cells of this run (the same split train made), and the left-out class.
    dm = instantiate(run_cfg.data, cache=None)
    dm.setup("fit")
    val = dm.val_set
    held = (
        np.array([val.dataset.samples[i][0] for i in val.indices]),
        np.array([val.dataset.samples[i][1] for i in val.indices]),
        np.array(dm.val_groups),
    )
    every, groups = instantiate(cfg.data, cache=None), read_groups_csv(run_cfg.data.groups)
    train_split, test_split = cfg.data.train_split, cfg.data.split
    unseen_train = split_images(every, train_split, [left], groups)
    unseen_test = split_images(every, test_split, [left], groups)
    test = split_images(every, test_split, classes, groups)
    record = {
        "left_out": left,
        "classes": classes,
        "checkpoint": ckpt,
        "selection": figures(
            clf, cfg.ood.rate, held, {left: (unseen_train[0], unseen_train[2])} | sets[0]
        ),
        "test": figures(
            clf, cfg.ood.rate, test, {left: (unseen_test[0], unseen_test[2])} | sets[1]
        ),
    }
    done.write_text(json.dumps(record, indent=2) + "\n")
    return record


def groups_file(cfg: DictConfig, out: Path) -> Path:
    """`<run>/groups.csv`: the source groups of every class's TRAIN and TEST images, so that the
    runs without one class split the same cells (and need not match them again)."""
    file = out / "groups.csv"
    if file.is_file():
        return file
    every = instantiate(cfg.data, cache=None)
    every.prepare_data()  # a generated set is made here; a download fetched
    paths, labels = [], []
    for split in (cfg.data.train_split, cfg.data.split):
        groups = every.source_groups(split, write=cfg.data.cache_dir is not None)
        offset = max(labels, default=-1) + 1
        paths += [str(Path(p).resolve()) for p in groups]
        labels += [offset + g for g in groups.values()]
    write_groups_csv(file, paths, labels)
    return file


def ood_table(result: dict[str, Any]) -> str:
    """ood.md: AUROC [95% interval] per set and score, and the flag's shares at its threshold."""
    lines = [f"Flag at {result['rate']:g} of held-out cells; chosen score: {result['chosen']}.", ""]
    lines += [
        "| model | set | score | AUROC | flagged | TEST false flags |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for model, parts in result["models"].items():
        for part, rows in parts.items():
            for name, scores in rows.items():
                for s, r in scores.items():
                    lines.append(
                        f"| {model} | {name} ({part}) | {s} | {r['auroc']:.3f} "
                        f"{interval(r['auroc_ci95'])} | {r['flagged']:.2f} "
                        f"{interval(r['flagged_ci95'])} | {r['false_flags']:.2f} |"
                    )
    return "\n".join(lines) + "\n"


def measure(cfg: DictConfig) -> dict[str, Any]:
    """The whole measurement (module docstring); returns ood_metrics.json's content."""
    out = Path(cfg.paths.output_dir)
    sets = [non_cell_sets(cfg, half) for half in (0, 1)]
    result: dict[str, Any] = {"rate": cfg.ood.rate, "models": {}}
    if cfg.ood.checkpoint:
        clf = load_classifier(cfg.ood.checkpoint)
        if not (clf.trust or {}).get("ood"):
            raise CellclsError(f"ood.checkpoint={cfg.ood.checkpoint} has no fitted OOD flag.")
        every, groups = instantiate(cfg.data, cache=None), read_groups_csv(groups_file(cfg, out))
        test = split_images(every, cfg.data.split, list(clf.classes), groups)
        result["models"]["checkpoint"] = {"test": figures(clf, cfg.ood.rate, test, sets[1])}
        result["chosen"] = clf.trust["ood"]["score"]
    else:
        left = cfg.ood.leave_out or list(cfg.data.classes)
        for c in left:
            r = leave_out(cfg, c, out, sets)
            result["models"][f"without {c}"] = {"selection": r["selection"], "test": r["test"]}
        picked = [r for m in result["models"].values() for r in m["selection"].values()]
        selection = {s: float(np.mean([r[s]["auroc"] for r in picked])) for s in SCORES}
        result["selection_auroc"] = selection
        result["chosen"] = max(selection, key=selection.get)
    (out / "ood_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "ood.md").write_text(ood_table(result))
    pooled = {
        f"{name} ({model})": scores
        for model, parts in result["models"].items()
        for name, scores in parts["test"].items()
    }
    plot_ood(pooled, out / "ood_auroc.png")
    log.info("OOD figures in %s (ood_metrics.json, ood.md, ood_auroc.png)", out)
    return result


def check_ood(cfg: DictConfig) -> None:
    o = cfg.ood
    require(is_level(o.rate), "ood.rate", o.rate, "a share in (0, 1) of held-out cells flagged")
    unknown = [c for c in o.leave_out or [] if c not in cfg.data.classes]
    require(not unknown, "ood.leave_out", o.leave_out, f"classes of {list(cfg.data.classes)}")
    if not o.checkpoint:
        require(
            cfg.data.val_split == "grouped",
            "data.val_split",
            cfg.data.val_split,
            "grouped (the flag is fitted on held-out cells)",
        )


@entry("ood", check=check_ood)
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the chosen score's mean selection AUROC (or, with
    `ood.checkpoint`, its mean TEST AUROC over the non-cell sets)."""
    result = measure(cfg)
    if "selection_auroc" in result:
        return result["selection_auroc"][result["chosen"]]
    rows = result["models"]["checkpoint"]["test"].values()
    return float(np.mean([r[result["chosen"]]["auroc"] for r in rows]))


if __name__ == "__main__":
    main()
