"""The Python API (`cellcls.load_classifier`): the one inference path of predict, and ONNX."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellcls import load_classifier
from cellcls.core.errors import CellclsError
from cellcls.export import export
from cellcls.predict import predict as predict_cfg
from cellcls.reports.trust import abstain_threshold, prediction_sets, set_thresholds
from tests.conftest import CLASSES, best_checkpoint, compose_run


def images_of(run: Path, folder: Path, n: int = 6) -> list[Path]:
    folder.mkdir()
    rows = list(csv.DictReader((run / "predictions.csv").open()))[:n]
    return [
        Path(shutil.copy(r["path"], folder / f"{k}{Path(r['path']).suffix}"))
        for k, r in enumerate(rows)
    ]


@pytest.mark.slow
def test_api_equals_predict_and_takes_every_input(trained_run, tmp_path: Path) -> None:
    run, _ = trained_run
    ckpt = best_checkpoint(run)
    files = images_of(run, tmp_path / "new")
    out = tmp_path / "predict"
    predict_cfg(
        compose_run([f"ckpt_path={ckpt}", f"inputs={tmp_path / 'new'}"], out, "predict"), out
    )
    rows = {r["path"]: r for r in csv.DictReader((out / "predictions.csv").open())}
    clf = load_classifier(ckpt, device="cpu")
    results = clf.predict(tmp_path / "new")
    assert [r.source for r in results] == sorted(str(f) for f in files)
    for r in results:
        assert r.label == rows[r.source]["pred"] and r.label in CLASSES
        for c in CLASSES:
            assert abs(r.probabilities[c] - float(rows[r.source][c])) <= 1e-6
    # The test loop (train's final test, cellcls.eval) scores the same images alike: one path.
    tested = list(csv.DictReader((run / "predictions.csv").open()))
    for row, r in zip(tested, clf.predict([t["path"] for t in tested]), strict=True):
        assert r.label == row["pred"]
        assert max(abs(r.probabilities[c] - float(row[c])) for c in CLASSES) <= 1e-6
    one = clf.predict(files[0])
    with Image.open(files[0]) as im:
        from_pil, from_array = clf.predict(im.copy()), clf.predict(np.asarray(im.convert("RGB")))
    for other in (from_pil, from_array):
        assert other.source is None and other.label == one.label
        assert max(abs(other.probabilities[c] - one.probabilities[c]) for c in CLASSES) <= 1e-6
    (tmp_path / "bad.png").write_text("no image")
    bad, good = clf.predict([tmp_path / "bad.png", files[0]])
    assert bad.label is None and "not an image" in bad.error and good.label == one.label
    assert "must be H x W x 3" in clf.predict(np.zeros((4, 4, 4), np.uint8)).error


@pytest.mark.slow
def test_onnx_export_matches_torch_and_carries_its_card(trained_run, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    run, _ = trained_run
    ckpt = best_checkpoint(run)
    folder = export(ckpt, tmp_path / "export", "onnx")
    meta = json.loads((folder / "metadata.json").read_text())
    report = json.loads((run / "metrics.json").read_text())
    assert meta["classes"] == CLASSES and meta["test"]["accuracy"] == report["accuracy"]
    assert meta["test"]["accuracy_ci95"] == report["accuracy_ci95"]
    assert meta["training_data"]["train_cells"] > 0 and meta["val_accuracy"] is not None
    assert f"{report['accuracy']:.3f}" in (folder / "model_card.md").read_text()
    files = images_of(run, tmp_path / "new", 8)
    torch_probs = load_classifier(folder, device="cpu", precision="32-true").predict(files)
    onnx_probs = load_classifier(folder, backend="onnx").predict(files)
    for a, b in zip(torch_probs, onnx_probs, strict=True):
        assert a.label == b.label
        assert max(abs(a.probabilities[c] - b.probabilities[c]) for c in CLASSES) <= 1e-4
    with pytest.raises(CellclsError, match="backend=onnx runs an export folder"):
        load_classifier(ckpt, backend="onnx")


@pytest.mark.slow
def test_sets_and_abstention_in_the_api_predict_and_the_export(trained_run, tmp_path: Path) -> None:
    run, _ = trained_run
    ckpt = best_checkpoint(run)
    files = images_of(run, tmp_path / "new", 12)
    clf = load_classifier(ckpt, device="cpu")
    trust = clf.trust
    results = clf.predict(files, coverage=0.9, abstain=0.95)
    confident = abstain_threshold(trust, 0.95)
    for mondrian in (False, True):
        thresholds = set_thresholds(trust, 0.9, mondrian)
        for r in clf.predict(files, coverage=0.9, mondrian=mondrian):
            p = np.array([[r.probabilities[c] for c in CLASSES]])
            member = prediction_sets(p, thresholds)[0]
            expected = [c for c, m in zip(CLASSES, member, strict=True) if m]
            assert list(r.set) == expected and r.label in r.set and r.unsure is None
    for r in results:
        assert r.unsure == (max(r.probabilities.values()) < confident)
    assert all(r.set is None and r.unsure is None for r in clf.predict(files[:2]))
    # predict's CSV: the same sets and flags.
    out = tmp_path / "predict"
    args = [f"ckpt_path={ckpt}", f"inputs={tmp_path / 'new'}", "coverage=0.9", "abstain=0.95"]
    predict_cfg(compose_run(args, out, "predict"), out)
    rows = {r["path"]: r for r in csv.DictReader((out / "predictions.csv").open())}
    for r in results:
        assert rows[r.source]["set"] == "|".join(r.set)
        assert rows[r.source]["unsure"] == str(int(r.unsure))
    # An export carries the calibration: the same probabilities and sets.
    exported = load_classifier(export(ckpt, tmp_path / "export"), device="cpu")
    assert exported.trust == trust
    for a, b in zip(results, exported.predict(files, coverage=0.9, abstain=0.95), strict=True):
        assert a.set == b.set and a.unsure == b.unsure
        assert max(abs(a.probabilities[c] - b.probabilities[c]) for c in CLASSES) <= 1e-6
    # A cv's conformal.json replaces the checkpoint's evidence for sets, not its temperature.
    file = tmp_path / "conformal.json"
    file.write_text(json.dumps(trust | {"cell_scores": [0.0] * trust["n_cells"]}))
    tight = load_classifier(ckpt, device="cpu", conformal=file).predict(files, coverage=0.9)
    for a, b in zip(results, tight, strict=True):
        assert b.set == (b.label,) and a.probabilities == b.probabilities
    file.write_text("{}")
    with pytest.raises(CellclsError, match="is not a conformal.json written by cellcls.cv"):
        load_classifier(ckpt, device="cpu", conformal=file)
    # Refused by name: a bad level, and an ensemble (no held-out calibration of its own).
    with pytest.raises(CellclsError, match="coverage=1.5 is not accepted"):
        clf.predict(files[0], coverage=1.5)
    ensemble = load_classifier([ckpt, run / "checkpoints" / "last.ckpt"], device="cpu")
    with pytest.raises(CellclsError, match="need a checkpoint calibrated on held-out cells"):
        ensemble.predict(files[0], abstain=0.9)
