"""Every PNG cellcls writes: confusion matrices, errors, reliability, training curves, groups,
crops, OOD separation.

Figures use matplotlib's object API (no pyplot), so nothing depends on a display or a backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from cellcls.core.images import open_image


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path) -> None:
    """Counts and row-normalised (recall) confusion matrices side by side."""
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    for ax, values, title, fmt in (
        (fig.add_subplot(1, 2, 1), cm, "counts", "d"),
        (fig.add_subplot(1, 2, 2), norm, "row-normalised (recall)", ".2f"),
    ):
        shown = values / values.max() if values.max() > 0 else values
        ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(values):
            ax.text(
                j,
                i,
                format(v, fmt),
                ha="center",
                va="center",
                color="white" if shown[i, j] > 0.5 else "black",
            )
        ax.set(
            title=title,
            xlabel="predicted",
            ylabel="true",
            xticks=range(len(classes)),
            yticks=range(len(classes)),
        )
        ax.set_xticklabels(classes, rotation=30, ha="right")
        ax.set_yticklabels(classes)
    fig.savefig(path, dpi=100)


def plot_errors(
    paths: Sequence[str],
    labels: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    path: Path,
    n: int = 16,
) -> None:
    """A grid of the `n` most confidently wrong images, with true and predicted class."""
    preds = probs.argmax(1)
    wrong = np.flatnonzero(preds != labels)
    wrong = wrong[np.argsort(-probs[wrong, preds[wrong]])][:n]
    cols = 4
    rows = max(1, math.ceil(len(wrong) / cols))
    fig = Figure(figsize=(3 * cols, 3.2 * rows), layout="constrained")
    if not len(wrong):
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no errors", ha="center", va="center", fontsize=16)
        ax.axis("off")
    for k, i in enumerate(wrong):
        ax = fig.add_subplot(rows, cols, k + 1)
        with open_image(paths[i]) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_title(
            f"true {classes[labels[i]]}\npred {classes[preds[i]]} ({probs[i, preds[i]]:.2f})",
            fontsize=9,
        )
        ax.axis("off")
    fig.savefig(path, dpi=80)


def plot_reliability(bins: Mapping[str, np.ndarray], ece: float, path: Path) -> None:
    """The reliability diagram: per bin of the top probability, accuracy against mean confidence
    (a calibrated model's bars meet the diagonal), and below it the images in each bin.

    `bins` is `cellcls.reports.metrics.reliability_bins`' (edges, count, confidence, accuracy)."""
    edges, count = np.asarray(bins["edges"]), np.asarray(bins["count"])
    left, width = edges[:-1], np.diff(edges)
    filled = count > 0
    fig = Figure(figsize=(6, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.bar(
        left[filled],
        np.asarray(bins["accuracy"])[filled],
        width[filled],
        align="edge",
        color="tab:blue",
        edgecolor="white",
        label="accuracy",
    )
    top.plot(
        np.asarray(bins["confidence"])[filled],
        np.asarray(bins["accuracy"])[filled],
        "o",
        color="tab:red",
        markersize=4,
        label="mean confidence, accuracy",
    )
    top.plot([0, 1], [0, 1], "--", color="grey", label="calibrated")
    top.set(ylim=(0, 1.05), ylabel="accuracy", title=f"reliability (ECE {ece:.4f})")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.bar(left, count, width, align="edge", color="tab:grey", edgecolor="white")
    for x, w, c in zip(left[filled], width[filled], count[filled], strict=True):
        bottom.text(x + w / 2, c, str(int(c)), ha="center", va="bottom", fontsize=7)
    bottom.set(xlim=(0, 1), xlabel="confidence (top probability)", ylabel="images")
    bottom.set_ylim(0, max(int(count.max(initial=0)), 1) * 1.25)
    fig.savefig(path, dpi=100)


def plot_risk_coverage(coverage: np.ndarray, risk: np.ndarray, path: Path) -> None:
    """Selective prediction: the error rate of the images kept (most confident first) against
    the share kept; the area under it (AURC) is in the title. Dropping the least confident
    images should lower the line towards the left."""
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(coverage, risk, color="tab:blue")
    ax.axhline(risk[-1] if len(risk) else 0, ls="--", color="grey", label="keeping every image")
    ax.set(
        xlim=(0, 1),
        ylim=(0, max(float(risk.max(initial=0)) * 1.1, 0.05)),
        xlabel="coverage (share of images kept, most confident first)",
        ylabel="risk (error rate of those kept)",
        title=f"risk-coverage (AURC {float(risk.mean()) if len(risk) else 0:.4f})",
    )
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def plot_curves(history: Sequence[Mapping[str, float]], path: str | Path) -> None:
    """Loss and accuracy per epoch for train and val, from one dict of metrics per epoch."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    for k, metric in enumerate(("loss", "acc")):
        ax = fig.add_subplot(1, 2, k + 1)
        for stage in ("train", "val"):
            key = f"{stage}/{metric}"
            points = [(h["epoch"], h[key]) for h in history if key in h]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=stage)
        ax.set(xlabel="epoch", ylabel=metric, title=metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)


def plot_groups(
    paths: Sequence[str],
    groups: np.ndarray,
    classes: Sequence[str],
    path: Path,
    rows: int = 8,
    per_row: int = 8,
    seed: int = 0,
) -> None:
    """A few source groups, one row of thumbnails each: groups that span several class folders
    first, then a seeded random choice of the others."""
    rng = np.random.default_rng(seed)
    ids = np.unique(groups)
    mixed = [g for g in ids if len({classes[i] for i in np.flatnonzero(groups == g)}) > 1]
    others = [g for g in rng.permutation(ids) if g not in mixed]
    shown = (mixed + others)[:rows]
    per_row = min(per_row, max((int(np.sum(groups == g)) for g in shown), default=1))
    fig = Figure(figsize=(1.6 * per_row, 1.5 * max(len(shown), 1)), layout="constrained")
    for r, g in enumerate(shown):
        members = np.flatnonzero(groups == g)
        picked = rng.choice(members, min(per_row, len(members)), replace=False)
        for k, i in enumerate(sorted(picked)):
            ax = fig.add_subplot(max(len(shown), 1), per_row, r * per_row + k + 1)
            with open_image(paths[i]) as im:
                ax.imshow(im.convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(classes[i][:4], fontsize=7)
            if k == 0:
                ax.set_ylabel(f"group {g}\n{len(members)} images", fontsize=8)
    fig.savefig(path, dpi=80)


def plot_crops(
    images: Tensor, labels: Tensor, classes: Sequence[str], path: Path, per_class: int = 10
) -> None:
    """One row of images (uint8, N x 3 x H x W) per class, to check the crops at a glance."""
    fig = Figure(figsize=(1.3 * per_class, 1.4 * len(classes)), layout="constrained")
    for r, name in enumerate(classes):
        members = (labels == r).nonzero().flatten()[:per_class]
        for k, i in enumerate(members.tolist()):
            ax = fig.add_subplot(len(classes), per_class, r * per_class + k + 1)
            ax.imshow(images[i].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.savefig(path, dpi=80)


def plot_ood(rows: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Path) -> None:
    """AUROC of each OOD score (bars, with 95% intervals over cells) on each set of images
    unlike the training set (`rows[set][score]`); 0.5 is chance, 1 a perfect separation."""
    sets = list(rows)
    scores = list(next(iter(rows.values()))) if rows else []
    fig = Figure(figsize=(max(6.0, 1.4 * len(sets) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(scores))
    for i, score in enumerate(scores):
        x = np.arange(len(sets)) + (i - (len(scores) - 1) / 2) * width
        value = np.array([rows[s][score]["auroc"] for s in sets])
        ci = np.array([rows[s][score]["auroc_ci95"] for s in sets]).reshape(-1, 2)
        yerr = np.clip(np.stack([value - ci[:, 0], ci[:, 1] - value]), 0, None)
        ax.bar(x, value, width, yerr=yerr, capsize=3, label=score)
    ax.axhline(0.5, ls="--", color="grey", label="chance")
    ax.set_xticks(np.arange(len(sets)), sets, rotation=15)
    ax.set(ylim=(0, 1.02), ylabel="AUROC (95% interval over cells)", title="OOD separation")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)
