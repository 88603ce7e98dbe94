"""`python -m cellcls.compare a=A b=B`: is B better than A, beyond the luck of the cells?

A and B are run folders (train or eval, holding `predictions.csv`; cv, holding
`oof_predictions.csv`) or such files, scored on the same images with their source groups (the
`group` column). Prints and writes (`compare.json`, in its own run folder) B − A in accuracy and
balanced accuracy with paired 95% intervals over source cells
(`cellcls.reports.intervals.paired_bootstrap`), and how many images and cells they disagree on.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from cellcls.core.errors import CellclsError, require_given
from cellcls.reports.intervals import paired_bootstrap
from cellcls.run.cli import entry

log = logging.getLogger(__name__)
FILES = ("predictions.csv", "oof_predictions.csv")  # a run folder's, in this order
USAGE = "python -m cellcls.compare a=RUN_OR_CSV b=RUN_OR_CSV"


def predictions_file(where: str | Path) -> Path:
    """The predictions file of a run folder (`FILES`, first found), or `where` itself."""
    where = Path(where)
    if where.is_dir():
        for name in FILES:
            if (where / name).is_file():
                return where / name
        raise CellclsError(f"'{where}' holds no {' or '.join(FILES)}: give a run folder or file.")
    if not where.is_file():
        raise CellclsError(f"'{where}' does not exist: give a run folder or its predictions.csv.")
    return where


def read_scored(file: Path) -> dict[str, tuple[str, str, str]]:
    """path -> (label, pred, group) of each image a predictions file scored (the predicted class
    is `pred` in predictions.csv, `predicted` in oof_predictions.csv)."""
    with file.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        pred = next((c for c in ("pred", "predicted") if c in columns), "pred")
        missing = [c for c in ("path", "label", pred, "group") if c not in columns]
        if missing:
            why = (
                "no source groups (written by test reports of this version: run eval again)"
                if missing == ["group"]
                else "not a scored run (predict's output has no labels)"
            )
            raise CellclsError(f"'{file}' has no {', '.join(missing)} column: {why}.")
        rows = {r["path"]: (r["label"], r[pred], r["group"]) for r in reader}
    if not rows:
        raise CellclsError(f"'{file}' scores no images.")
    return rows


def compare(a: str | Path, b: str | Path, seed: int = 0) -> dict[str, Any]:
    """B − A on the images both scored (the same ones, or a one-line error naming the file)."""
    file_a, file_b = predictions_file(a), predictions_file(b)
    rows_a, rows_b = read_scored(file_a), read_scored(file_b)
    if rows_a.keys() != rows_b.keys():
        only_a, only_b = len(rows_a.keys() - rows_b.keys()), len(rows_b.keys() - rows_a.keys())
        raise CellclsError(
            f"'{file_b}' was scored on other images than '{file_a}' ({only_b} of its "
            f"{len(rows_b)} not in A, {only_a} of A's {len(rows_a)} not in it): compare runs "
            "scored on the same split."
        )
    paths = list(rows_a)
    (label_a, pred_a, group_a), (label_b, pred_b, group_b) = (
        np.array([rows[p] for p in paths]).T for rows in (rows_a, rows_b)
    )
    if (label_a != label_b).any():
        raise CellclsError(f"'{file_b}' gives other labels than '{file_a}' to the same images.")
    pairs = set(zip(group_a.tolist(), group_b.tolist(), strict=True))
    if len(pairs) != len(set(group_a.tolist())) or len(pairs) != len(set(group_b.tolist())):
        raise CellclsError(f"'{file_b}' groups the images otherwise than '{file_a}'.")
    result = paired_bootstrap(pred_a == label_a, pred_b == label_b, label_a, group_a, seed=seed)
    disagree = pred_a != pred_b
    return result | {
        "disagree_images": int(disagree.sum()),
        "disagree_groups": len(set(group_a[disagree].tolist())),
        "a": str(file_a),
        "b": str(file_b),
        "seed": seed,
    }


def describe(result: dict[str, Any]) -> str:
    """The console's lines for a comparison."""

    def signed(v: float) -> str:
        return f"{v:+.4f}"

    n, g = result["n_images"], result["n_groups"]
    return "\n".join(
        [
            f"A: {result['a']}",
            f"B: {result['b']}",
            f"accuracy          A {result['accuracy_a']:.4f}  B {result['accuracy_b']:.4f}  "
            f"B - A {signed(result['difference'])} "
            f"[{signed(result['ci95'][0])}, {signed(result['ci95'][1])}]",
            f"balanced accuracy A {result['balanced_accuracy_a']:.4f}  "
            f"B {result['balanced_accuracy_b']:.4f}  B - A {signed(result['balanced_difference'])} "
            f"[{signed(result['balanced_ci95'][0])}, {signed(result['balanced_ci95'][1])}]",
            f"(paired 95% intervals over {g} source cells, {result['n_resamples']} resamples)",
            f"They disagree on {result['disagree_images']} of {n} images, in "
            f"{result['disagree_groups']} of {g} cells.",
        ]
    )


@entry("compare")
def main(cfg: DictConfig) -> None:
    require_given(cfg, ["a", "b"], USAGE)
    result = compare(cfg.a, cfg.b, seed=cfg.seed)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("%s\nWritten to %s", describe(result), out / "compare.json")


if __name__ == "__main__":
    main()
