"""`python -m cellcls.eval` on checkpoints of a short training run, and its messages."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from cellcls.core.errors import CellclsError
from cellcls.eval import evaluate as evaluate_cfg
from cellcls.eval import main
from cellcls.run.checkpoint import restore
from tests.conftest import CLASSES, FAST, best_checkpoint, compose_run, run_module

EVAL_FAST = [a for a in FAST if not a.startswith(("data=", "data.image_size"))]


def evaluate(cwd: Path, cache: Path, ckpt: Path | str, *args: str):
    """`python -m cellcls.eval` as a user runs it: a subprocess (for its console and messages)."""
    out = cwd / "eval"
    result = run_module(
        "cellcls.eval", [f"ckpt_path={ckpt}", *EVAL_FAST, f"hydra.run.dir={out}", *args], cwd, cache
    )
    return out, result


@pytest.fixture
def eval_here(trained_run, synthetic_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """cellcls.eval's function in the test process, in the trained run's working folder (its
    data paths are relative to it): `eval_here(ckpt, *args)` returns (out, metrics.json)."""
    monkeypatch.setenv("CELLCLS_CACHE", str(synthetic_cache))
    monkeypatch.chdir(trained_run[0].parents[1])

    def run(ckpt: Path | str, *args: str) -> tuple[Path, dict]:
        out = tmp_path / "eval"
        overrides = [f"ckpt_path={ckpt}", *EVAL_FAST, *args]
        evaluate_cfg(compose_run(overrides, out, "eval"), overrides)
        return out, json.loads((out / "metrics.json").read_text())

    return run


@pytest.mark.slow
def test_eval_reproduces_train_test_accuracy(trained_run, tmp_path, synthetic_cache) -> None:
    run, _ = trained_run
    out, result = evaluate(run.parents[1], synthetic_cache, best_checkpoint(run))
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((run / "metrics.json").read_text())
    evaluated = json.loads((out / "metrics.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(trained["accuracy"], abs=1e-9)
    assert evaluated["split"] == "TEST" and evaluated["n_images"] == trained["n_images"]
    assert evaluated["checkpoint"] == str(best_checkpoint(run))
    assert "balanced accuracy" in result.stderr + result.stdout  # the console table
    # The checkpoint carries its calibration: eval applies it and gives the same sets.
    assert evaluated["trust"]["temperature"] == trained["trust"]["temperature"]
    for level, figures in trained["trust"]["conformal"].items():
        assert evaluated["trust"]["conformal"][level]["coverage"] == figures["coverage"]
        assert evaluated["trust"]["conformal"][level]["mean_set_size"] == figures["mean_set_size"]


@pytest.mark.slow
def test_report_files_are_well_formed(trained_run, tmp_path, synthetic_cache) -> None:
    run, _ = trained_run
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "loss", "n_images", "split"):
        assert key in metrics
    assert set(metrics["per_class"]) == set(CLASSES)
    assert set(metrics["per_class"]["MONOCYTE"]) == {"precision", "recall", "f1", "support"}
    rows = list(csv.DictReader((run / "predictions.csv").open()))
    assert list(rows[0]) == ["path", "label", "pred", *CLASSES, "group"]
    assert len(rows) == metrics["n_images"]
    assert all(Path(r["path"]).is_file() for r in rows)
    accuracy = sum(r["label"] == r["pred"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(metrics["accuracy"])
    for r in rows:
        assert sum(float(r[c]) for c in CLASSES) == pytest.approx(1.0, abs=1e-4)
        assert max(CLASSES, key=lambda c: float(r[c])) == r["pred"]
    cm = list(csv.reader((run / "confusion_matrix.csv").open()))
    assert cm[0][1:] == CLASSES and [r[0] for r in cm[1:]] == CLASSES
    assert sum(int(v) for r in cm[1:] for v in r[1:]) == len(rows)
    for png in ("confusion_matrix.png", "errors.png", "curves.png"):
        with Image.open(run / png) as im:
            im.verify()


@pytest.mark.slow
def test_eval_another_split_folder(trained_run, tmp_path, eval_here) -> None:
    run, _ = trained_run
    saved = torch.load(best_checkpoint(run), weights_only=True)["cellcls_config"]
    source = Path(saved["data"]["root"])
    if not source.is_absolute():
        source = run.parents[1] / source
    other = tmp_path / "elsewhere"
    shutil.copytree(source / "TEST", other / "OTHER")
    for c in CLASSES:  # a smaller folder, so the count shows which one was scored
        for f in sorted((other / "OTHER" / c).iterdir())[5:]:
            f.unlink()
    _, metrics = eval_here(best_checkpoint(run), f"data.root={other}", "data.split=OTHER")
    assert metrics["split"] == "OTHER" and metrics["n_images"] == 4 * 5


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.net.hidden=64"], "does not fit the model built from its config"),
        (["data.image_size=64"], "trained on 48x48 images"),
        (["data.classes=[A,B,C,D]"], "was trained for classes"),
    ],
)
def test_eval_mismatch_is_one_clear_message(
    trained_run, eval_here, args: list[str], message: str
) -> None:
    with pytest.raises(CellclsError, match=message):
        eval_here(best_checkpoint(trained_run[0]), *args)


def test_eval_bad_checkpoints(tmp_path: Path) -> None:
    """Each is refused by name; the entry point ends with the one line, not a traceback."""
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(SystemExit) as stop:
        main.__wrapped__(compose_run([f"ckpt_path={missing}", *EVAL_FAST], tmp_path, "eval"))
    assert f"'{missing}' does not exist" in str(stop.value.code)
    assert "\n" not in str(stop.value.code)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint")
    for ckpt, message in {
        foreign: "was not written by cellcls.train",
        garbage: "is not a readable checkpoint",
    }.items():
        with pytest.raises(CellclsError, match=f"'{ckpt}'.*{message}"):
            restore(ckpt, data=False)


@pytest.mark.slow
def test_ensemble_averages_its_members_probabilities(trained_run) -> None:
    run, _ = trained_run
    paths = [best_checkpoint(run), run / "checkpoints" / "last.ckpt"]
    members = [restore(p, data=False).model.eval() for p in paths]
    ensemble = restore(paths, data=False, ensemble=True).model.eval()
    x = torch.randint(0, 256, (5, 3, 48, 48), dtype=torch.uint8)
    with torch.no_grad():
        alone = [m.predict_step(x, 0) for m in members]
        together = ensemble.predict_step(x, 0)
    assert not torch.allclose(alone[0], alone[1])  # two different models
    torch.testing.assert_close(together, (alone[0] + alone[1]) / 2)
    with pytest.raises(CellclsError, match="give one checkpoint here"):
        restore(paths, data=False)  # export, resuming: one checkpoint only


@pytest.mark.slow
def test_eval_of_an_ensemble(trained_run, tmp_path, eval_here) -> None:
    """`ckpt_path=[A,B]` scores the average; members that held out other cells of TRAIN are
    refused for data.split=val (some trained on the images scored), not for TEST."""
    run, _ = trained_run
    best = best_checkpoint(run)
    ckpt = torch.load(best, weights_only=True)
    ckpt["cellcls_config"]["data"]["seed"] += 1
    other = tmp_path / "other_split.ckpt"
    torch.save(ckpt, other)
    _, metrics = eval_here(f"[{best},{other}]")
    single = json.loads((run / "metrics.json").read_text())
    # The same weights twice: the average is the model itself.
    assert metrics["accuracy"] == pytest.approx(single["accuracy"], abs=1e-9)
    assert metrics["checkpoint"] == f"{best}, {other}"
    with pytest.raises(CellclsError, match=f"'{other}' was trained with data.seed="):
        eval_here(f"[{best},{other}]", "data.split=val")
