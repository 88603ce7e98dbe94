"""The model card of an export: `metadata.json` for programs, `model_card.md` for people.

Every figure is read from the run's own files: the checkpoint (its grouped-validation accuracy,
the images and source cells it trained on), the run folder's test report (`metrics.json`), the
cross-validation report above a fold's folder (`cv_metrics.json`) and the run record
(`run.json`: command, commit, machine, date). Nothing is retyped; what a run did not measure is
said to be missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LIMITS = (
    "A research model, not a diagnostic device: it has not been validated for clinical use.",
    "It was trained on one dataset's images (one stain, one microscope); images from another "
    "lab, stain or magnification may be classified confidently and wrongly.",
    "It knows only the classes listed; a cell of any other type is given one of them.",
    "The intervals are over source cells: TEST holds few independent cells, and a class with "
    "few of them (the monocytes) has a much wider interval than the overall one.",
    "Its calibration, prediction sets, unsure and out-of-distribution flags were fitted on "
    "held-out training cells; they hold approximately on images like those. The "
    "out-of-distribution flag bounds how often it flags such images, not how many unlike ones "
    "it catches (docs/trust.md measures that): a confident answer on an odd image is possible.",
)
# From a test report: the figures a card quotes.
TEST_KEYS = (
    "split",
    "accuracy",
    "accuracy_ci95",
    "balanced_accuracy",
    "balanced_accuracy_ci95",
    "macro_f1",
    "calibration_error",
    "n_images",
    "n_groups",
)
CV_KEYS = ("folds", "n_images", "n_groups", "oof_accuracy", "oof_accuracy_ci95")


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_score(checkpoint: dict[str, Any], monitor: str = "val/acc") -> float | None:
    """The monitored validation score of the epoch the checkpoint holds (ModelCheckpoint's)."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and f"'monitor': '{monitor}'" in key:
            score = state.get("current_score", state.get("best_model_score"))
            return None if score is None else float(score)
    return None


def metadata(
    ckpt_path: str | Path,
    checkpoint: dict[str, Any],
    config: dict[str, Any],
    summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What an export says of its model, from the checkpoint and the run folder it came from."""
    ckpt_path = Path(ckpt_path).resolve()
    run_dir = ckpt_path.parent
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    data, model = config["data"], config["model"]
    hparams = checkpoint.get("hyper_parameters", {})
    test = read_json(run_dir / "metrics.json")
    if test is not None and Path(test.get("checkpoint") or ckpt_path).resolve() != ckpt_path:
        test = None  # the report of another checkpoint of the run
    cv = read_json(run_dir.parent / "cv_metrics.json")  # a fold of cellcls.cv
    record = read_json(run_dir / "run.json") or read_json(run_dir.parent / "run.json") or {}
    return {
        "classes": list(data["classes"]),
        "input": {
            "image_size": data["image_size"],
            "crop": data.get("crop"),
            "pixels": "uint8 RGB, N x size x size x 3 (ONNX) or N x 3 x size x size (torch)",
        },
        "normalization": {
            "mean": hparams.get("mean"),
            "std": hparams.get("std"),
            "source": hparams.get("normalization"),
        },
        "network": model["net"].get("_target_"),
        "training_data": {
            "root": data.get("root"),
            "split": data.get("train_split"),
            "val_split": data.get("val_split"),
            **(summary or {}),  # the grouped split's images and cells
        },
        "checkpoint": str(ckpt_path),
        "epoch": checkpoint.get("epoch"),
        "val_accuracy": checkpoint_score(checkpoint),
        "test": (
            {k: test[k] for k in TEST_KEYS if k in test} | per_class(test) | test_trust(test)
            if test
            else None
        ),
        "cv": {k: cv[k] for k in CV_KEYS if k in cv} if cv else None,
        "run": {k: record.get(k) for k in ("command", "date", "git_commit", "machine")},
        "limits": list(LIMITS),
        # Held-out evidence for calibrated probabilities, prediction sets and abstention
        # (cellcls.reports.trust): the API reads it from here for an export.
        "trust": checkpoint.get("trust"),
    }


def test_trust(test: dict[str, Any]) -> dict[str, Any]:
    """The test report's calibration and conformal figures, without the per-class detail."""
    trust = test.get("trust")
    if not trust:
        return {}
    keep = ("coverage", "coverage_ci95", "mean_set_size", "mean_set_size_ci95")
    conformal = {level: {k: v[k] for k in keep} for level, v in trust.get("conformal", {}).items()}
    return {
        "temperature": trust["temperature"],
        "calibration_error_uncalibrated": trust["calibration_error_uncalibrated"],
        "calibration_error_uncalibrated_ci95": trust["calibration_error_uncalibrated_ci95"],
        "calibration_error_ci95": trust["calibration_error_ci95"],
        "conformal": conformal,
        **({"ood": trust["ood"]} if "ood" in trust else {}),
    }


def per_class(test: dict[str, Any]) -> dict[str, Any]:
    rows = test.get("per_class") or {}
    recall = {c: {"recall": r["recall"], "support": r["support"]} for c, r in rows.items()}
    return {"per_class_recall": recall}


def interval(value: float, ci: list[float] | None) -> str:
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def card(meta: dict[str, Any]) -> str:
    """model_card.md: the same facts as metadata.json, in words."""
    train, test, cv, run = meta["training_data"], meta["test"], meta["cv"], meta["run"]
    inp = meta["input"]
    crop = f"a square of {inp['crop']} of the shorter side around the white cell"
    size, norm, machine = inp["image_size"], meta["normalization"], run.get("machine") or {}
    lines = [
        "# Model card",
        "",
        f"Classifies a white-blood-cell image as one of {', '.join(meta['classes'])}.",
        "",
        "## Input",
        f"- Preprocessing: 8-bit RGB; crop: {crop if inp['crop'] else 'none'}; resized to "
        f"{size}x{size}.",
        f"- Normalisation (inside the model): mean {norm['mean']}, std {norm['std']} "
        f"({norm['source']}).",
        f"- Network: `{meta['network']}`; checkpoint of epoch {meta['epoch']}.",
        "",
        "## Training data",
        f"- {train.get('root')} ({train.get('split')}), validation: {train.get('val_split')}.",
    ]
    if "train_images" in train:
        lines.append(
            f"- Trained on {train['train_images']} images of {train['train_cells']} source cells; "
            f"validated on {train['val_images']} images of {train['val_cells']} other cells."
        )
    lines += ["", "## How good it is"]
    val = meta["val_accuracy"]
    lines.append(
        "- Validation accuracy (held-out source cells; this checkpoint was chosen on it): "
        + (f"{val:.3f}" if val is not None else "not recorded")
    )
    if test:
        lines.append(
            f"- {test['split']} accuracy: {interval(test['accuracy'], test.get('accuracy_ci95'))} "
            f"(95% interval over {test.get('n_groups')} source cells, {test['n_images']} images); "
            "balanced accuracy "
            f"{interval(test['balanced_accuracy'], test.get('balanced_accuracy_ci95'))}; "
            f"calibration error (ECE) {test['calibration_error']:.3f}."
        )
        if "temperature" in test:
            ece = interval(test["calibration_error"], test["calibration_error_ci95"])
            raw = test["calibration_error_uncalibrated"]
            raw = interval(raw, test["calibration_error_uncalibrated_ci95"])
            lines.append(
                f"- Calibrated: probabilities use temperature {test['temperature']:.3f}, fitted "
                f"on the validation cells; ECE on {test['split']} {ece} (before: {raw})."
            )
            for level, v in test["conformal"].items():
                lines.append(
                    f"- Prediction sets at {level}: coverage on {test['split']} "
                    f"{interval(v['coverage'], v['coverage_ci95'])}, mean size "
                    f"{interval(v['mean_set_size'], v['mean_set_size_ci95'])} classes."
                )
            ood = dict(test.get("ood") or {})
            score = ood.pop("score", None)
            for rate, v in ood.items():
                lines.append(
                    f"- Out-of-distribution flag ({score} score, set to flag {rate} of held-out "
                    f"cells): flags {interval(v['false_flags'], v.get('false_flags_ci95'))} of "
                    f"{test['split']}'s images, all of the training classes."
                )
        lines += ["", "| class | recall | images |", "|---|---|---|"]
        lines += [
            f"| {c} | {r['recall']:.3f} | {r['support']} |"
            for c, r in test["per_class_recall"].items()
        ]
        lines.append("")
    else:
        lines.append("- Test accuracy: not measured (no test report of this checkpoint).")
    if cv:
        lines.append(
            f"- Cross-validation ({cv['folds']} folds by source cell, out of fold): "
            f"{interval(cv['oof_accuracy'], cv.get('oof_accuracy_ci95'))} over {cv['n_groups']} "
            "cells."
        )
    lines += [
        "",
        "## Provenance",
        f"- Command: `{run.get('command')}`",
        f"- Commit {run.get('git_commit')}, {run.get('date')}, on {machine.get('cpu')}"
        + (f" with {machine['gpu']}" if machine.get("gpu") else ""),
        "",
        "## Limits",
        *(f"- {limit}" for limit in meta["limits"]),
        "",
    ]
    return "\n".join(lines)


def write_card(out: Path, meta: dict[str, Any]) -> None:
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "model_card.md").write_text(card(meta))
