"""The OOD flag: its statistics where the truth is known, its scores in the network, the flag in
the API, predict, the test report and the export, and `python -m cellcls.ood` end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cellcls.core.errors import CellclsError
from cellcls.data.crop import find_cell
from cellcls.data.generate import render_cell
from cellcls.data.outliers import SLIDES, noise, red_cell_fields, synthetic_cells
from cellcls.export import export
from cellcls.inference import load_classifier
from cellcls.models.ood import SCORES, embed, scores
from cellcls.models.smallcnn import SmallCNN
from cellcls.predict import predict as predict_cfg
from cellcls.reports.ood import auroc, fit_gaussian, ood_threshold, separation
from tests.conftest import FAST, best_checkpoint, compose_run, run_module
from tests.test_api import images_of


def test_auroc_is_the_mann_whitney_area_and_weights_repeat_images() -> None:
    rng = np.random.default_rng(0)
    inside = rng.integers(0, 20, 300).astype(float)  # many ties
    outside = rng.integers(5, 25, 200).astype(float)
    labels = np.r_[np.zeros(300), np.ones(200)]
    expected = roc_auc_score(labels, np.r_[inside, outside])
    assert auroc(inside, outside)[0] == pytest.approx(expected, abs=1e-12)
    a, b = rng.integers(0, 3, (1, 300)), rng.integers(0, 3, (1, 200))
    repeated = roc_auc_score(
        np.r_[np.zeros(a.sum()), np.ones(b.sum())],
        np.r_[np.repeat(inside, a[0]), np.repeat(outside, b[0])],
    )
    assert auroc(inside, outside, a.astype(float), b.astype(float))[0] == pytest.approx(repeated)


def test_the_flag_wrongly_flags_at_most_its_rate_of_new_cells() -> None:
    """Exchangeable cells: over many draws of 40 held-out cells, a new cell is flagged with
    probability <= rate (and close to it), within the binomial error of the draws."""
    rng = np.random.default_rng(1)
    for rate in (0.05, 0.1, 0.2):
        draws = 4000
        held = rng.normal(size=(draws, 40))
        new = rng.normal(size=draws)
        flagged = [
            new[i] > ood_threshold({"score": "s", "cell_scores": {"s": held[i]}}, rate)
            for i in range(draws)
        ]
        error = 3 * np.sqrt(rate * (1 - rate) / draws)
        assert np.mean(flagged) <= rate + error
        assert np.mean(flagged) >= rate - 1 / 41 - error  # conformal is at most 1/(n+1) over
    # Too few cells for the rate: no threshold, nothing flagged.
    assert ood_threshold({"score": "s", "cell_scores": {"s": [0.1, 0.2]}}, 0.05) == np.inf


def test_mahalanobis_of_fitted_classes_finds_the_far_points_and_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    means = np.array([[0.0] * 8, [4.0] * 8, [-4.0] * 8])
    labels = rng.integers(0, 3, 900)
    features = means[labels] + rng.normal(size=(900, 8))
    gaussian = fit_gaussian(features, labels, 3)
    assert np.allclose(gaussian["means"], means, atol=0.2)
    near = means[rng.integers(0, 3, 50)] + rng.normal(size=(50, 8))
    far = rng.normal(size=(50, 8)) * 3 + 10
    f = torch.tensor(np.r_[near, far], dtype=torch.float32)
    got = scores(f, torch.zeros(100, 3), 1.0, gaussian)["mahalanobis"].numpy()
    d = np.r_[near, far][:, None, :] - np.array(gaussian["means"])[None]
    expected = np.einsum("nkf,fg,nkg->nk", d, np.array(gaussian["precision"]), d).min(1)
    assert np.allclose(got, expected, rtol=1e-4)
    assert auroc(got[:50], got[50:])[0] == 1.0


def test_msp_and_energy_from_logits() -> None:
    logits = torch.tensor([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    out = scores(torch.zeros(2, 4), logits, 2.0, None)
    assert set(out) == {"msp", "energy"}  # no Gaussian: no Mahalanobis
    assert out["msp"][0] < out["msp"][1] and out["energy"][0] < out["energy"][1]
    assert out["energy"][1].item() == pytest.approx(-2 * np.log(3 * np.exp(0.5)), rel=1e-6)


def test_embed_catches_the_heads_input() -> None:
    class Wrapper(torch.nn.Module):  # what embed needs of a CellClassifier: net and forward
        def __init__(self) -> None:
            super().__init__()
            self.net = SmallCNN(image_size=16, hidden=12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model = Wrapper().eval()
    x = torch.rand(5, 3, 16, 16)
    features, logits = embed(model, x)
    assert features.shape == (5, 12) and logits.shape == (5, 4)
    torch.testing.assert_close(model.net.classifier[-1](features), logits)


def test_separation_intervals_and_shares() -> None:
    rng = np.random.default_rng(3)
    inside = rng.normal(size=200)
    outside = rng.normal(2.0, size=100)
    labels, groups = rng.integers(0, 2, 200), np.repeat(np.arange(40), 5)
    row = separation(inside, labels, groups, outside, np.repeat(np.arange(20), 5), 1.645)
    assert row["auroc_ci95"][0] < row["auroc"] < row["auroc_ci95"][1]
    assert row["auroc"] == pytest.approx(
        roc_auc_score(np.r_[[0] * 200, [1] * 100], np.r_[inside, outside])
    )
    assert row["false_flags"] == pytest.approx(np.mean(inside > 1.645))
    assert row["flagged"] == pytest.approx(np.mean(outside > 1.645))
    assert row["n_outside_groups"] == 20


def test_non_cell_images(tmp_path: Path) -> None:
    slides = tmp_path / SLIDES
    slides.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        field, _ = render_cell("LYMPHOCYTE", rng, (640, 480))
        field.save(slides / f"BloodImage_{i:05d}.jpg")
    images, groups = red_cell_fields(tmp_path, 32, 0.5, per_slide=2)
    assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
    assert set(groups) <= {0, 1, 2} and len(images) >= 3
    # Windows of the slide's own size with no nucleus stain in them.
    big, _ = red_cell_fields(tmp_path, 240, 0.5, per_slide=1)
    assert all(find_cell(w) is None for w in big)
    with pytest.raises(CellclsError, match="no slides in"):
        red_cell_fields(tmp_path / "nowhere", 32, 0.5)
    cells, g = synthetic_cells(5, 24, None)
    pixels, h = noise(4, 24)
    assert cells.shape == (5, 24, 24, 3) and pixels.shape == (4, 24, 24, 3)
    assert list(g) == list(range(5)) and list(h) == list(range(4))


@pytest.mark.slow
def test_the_flag_in_the_api_predict_report_and_export(trained_run, tmp_path: Path) -> None:
    run, _ = trained_run
    ckpt = best_checkpoint(run)
    clf = load_classifier(ckpt, device="cpu", precision="32-true")
    ood = clf.trust["ood"]
    assert set(ood["cell_scores"]) == set(SCORES) and ood["score"] in SCORES
    assert len(ood["cell_scores"]["msp"]) == clf.trust["n_cells"]
    # Noise is unlike every training image: the flag catches most of it; held-out-like test
    # images are flagged far less.
    size = clf.image_size
    pixels = list(np.random.default_rng(0).integers(0, 256, (20, size, size, 3), dtype=np.uint8))
    tests = [Path(r["path"]) for r in csv.DictReader((run / "predictions.csv").open())]
    flagged_noise = np.mean([r.ood for r in clf.predict(pixels, ood=0.05)])
    flagged_test = np.mean([r.ood for r in clf.predict(tests, ood=0.05)])
    assert flagged_noise >= 0.8 and flagged_test < flagged_noise
    r = clf.predict(tests[0], ood=0.05)
    threshold = ood_threshold(ood, 0.05)
    assert r.ood == (r.ood_score > threshold)
    assert clf.predict(tests[0]).ood is None  # not asked
    with pytest.raises(CellclsError, match="ood=2 is not accepted"):
        clf.predict(tests[0], ood=2)
    # The test report: the false flags of TEST at report.ood.
    report = json.loads((run / "metrics.json").read_text())["trust"]["ood"]
    assert report["score"] == ood["score"] and 0 <= report["0.05"]["false_flags"] <= 1
    # predict's CSV: the same flags and scores.
    out = tmp_path / "predict"
    folder = images_of(run, tmp_path / "new", 8)[0].parent
    args = [f"ckpt_path={ckpt}", f"inputs={folder}", "ood=0.05", "precision=32-true"]
    predict_cfg(compose_run(args, out, "predict"), out)
    rows = {row["path"]: row for row in csv.DictReader((out / "predictions.csv").open())}
    for r in clf.predict(folder, ood=0.05):
        assert rows[r.source]["ood"] == str(int(r.ood))
        assert float(rows[r.source]["ood_score"]) == pytest.approx(r.ood_score, rel=1e-4)
    # An export carries the flag (its Gaussian in metadata.json); ONNX computes its scores.
    folder = export(ckpt, tmp_path / "export", "onnx" if _has_onnx() else "safetensors")
    for backend in ("torch", "onnx") if _has_onnx() else ("torch",):
        exported = load_classifier(folder, device="cpu", precision="32-true", backend=backend)
        for a, b in zip(
            clf.predict(pixels[:5], ood=0.05), exported.predict(pixels[:5], ood=0.05), strict=True
        ):
            assert a.ood == b.ood and b.ood_score == pytest.approx(a.ood_score, rel=1e-3)
    # An ensemble has no flag of its own: refused by name.
    ensemble = load_classifier([ckpt, ckpt], device="cpu")
    with pytest.raises(CellclsError, match="need a checkpoint calibrated"):
        ensemble.predict(tests[0], ood=0.05)


def _has_onnx() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_ood_leaves_a_class_out_and_measures_its_scores(
    tmp_path: Path, synthetic_cache: Path
) -> None:
    args = [
        *FAST,
        "data.n_train=40",
        "data.n_test=10",
        "data.copies=1",
        "trainer.max_epochs=3",
        "ood.leave_out=[MONOCYTE]",
        "ood.red_cells=false",
        "ood.synthetic=10",
        "ood.noise=20",
        "hydra.run.dir=outputs/ood",
    ]
    result = run_module("cellcls.ood", args, tmp_path, synthetic_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "outputs" / "ood"
    metrics = json.loads((out / "ood_metrics.json").read_text())
    assert metrics["chosen"] in SCORES and set(metrics["selection_auroc"]) == set(SCORES)
    model = metrics["models"]["without MONOCYTE"]
    assert set(model["selection"]) == {"MONOCYTE", "generated cells", "noise"}
    assert set(model["test"]) == {"MONOCYTE", "generated cells", "noise"}
    for rows in model["test"].values():
        for row in rows.values():
            low, high = row["auroc_ci95"]
            assert 0 <= low <= row["auroc"] <= high <= 1
    # Noise is far from every training feature.
    assert model["test"]["noise"]["mahalanobis"]["auroc"] >= 0.9
    assert (out / "ood_auroc.png").is_file() and "| without MONOCYTE |" in (
        out / "ood.md"
    ).read_text()
    assert (
        json.loads((out / "run.json").read_text())["result"]["ood_metrics.json"]["chosen"]
        == metrics["chosen"]
    )
    # The run without MONOCYTE trained on three classes; a second run keeps it.
    ckpt = best_checkpoint(out / "without_MONOCYTE")
    assert load_classifier(ckpt, device="cpu").classes == ["EOSINOPHIL", "LYMPHOCYTE", "NEUTROPHIL"]
    again = run_module("cellcls.ood", args, tmp_path, synthetic_cache)
    said = again.stdout + again.stderr
    assert again.returncode == 0 and "Without MONOCYTE: done" in said and "kept" in said
    asked = [a if not a.startswith("ood.leave_out") else "ood.leave_out=[BASOPHIL]" for a in args]
    bad = run_module("cellcls.ood", asked, tmp_path, synthetic_cache)
    said = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "ood.leave_out" in said and "Traceback" not in said
