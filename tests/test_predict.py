"""`python -m cellcls.predict` on a folder of new images, bad files included."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from cellcls.core.errors import CellclsError
from cellcls.predict import predict as predict_cfg
from cellcls.train import train
from tests.conftest import CLASSES, best_checkpoint, compose_run, run_module


class RunsCode:
    """What a tampered checkpoint carries: unpickling it would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def tampered(trained_run, tmp_path: Path) -> tuple[Path, Path]:
    """A real checkpoint with a pickled callable added, and the file its code would create."""
    ckpt = torch.load(best_checkpoint(trained_run[0]), weights_only=True)
    marker = tmp_path / "pwned"
    ckpt["extra"] = RunsCode(marker)
    torch.save(ckpt, tmp_path / "tampered.ckpt")
    return tmp_path / "tampered.ckpt", marker


def predict(cwd: Path, cache: Path, *args: str):
    """`python -m cellcls.predict` as a user runs it: a subprocess (for its console)."""
    out = cwd / "predict"
    result = run_module("cellcls.predict", [*args, f"hydra.run.dir={out}"], cwd, cache)
    return out, result


def predict_here(out: Path, ckpt: Path | str, inputs: Path) -> list[dict[str, str]]:
    """cellcls.predict's function in the test process: the rows of its predictions.csv."""
    predict_cfg(compose_run([f"ckpt_path={ckpt}", f"inputs={inputs}"], out, "predict"), out)
    return list(csv.DictReader((out / "predictions.csv").open()))


@pytest.mark.slow
def test_predict_a_folder_with_a_bad_file(trained_run, tmp_path, synthetic_cache) -> None:
    run, _ = trained_run
    evaluated = {r["path"]: r for r in csv.DictReader((run / "predictions.csv").open())}
    inputs = tmp_path / "new"
    (inputs / "nested").mkdir(parents=True)
    copied = {}
    for k, path in enumerate(sorted(evaluated)[:12]):
        target = inputs / ("nested" if k % 2 else "") / f"{k}{Path(path).suffix}"
        shutil.copy(path, target)
        copied[str(target)] = evaluated[path]
    with Image.open(next(iter(copied))) as im:
        im.convert("L").save(inputs / "gray.png")
    (inputs / "broken.jpg").write_text("not an image")
    (inputs / "empty.png").touch()
    (inputs / "notes.txt").write_text("ignored")

    out, result = predict(
        tmp_path, synthetic_cache, f"ckpt_path={best_checkpoint(run)}", f"inputs={inputs}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert list(rows[0]) == ["path", "pred", *CLASSES]  # eval's layout, without the label
    assert {r["path"] for r in rows} == {*copied, str(inputs / "gray.png")}
    for r in rows:
        assert sum(float(r[c]) for c in CLASSES) == pytest.approx(1.0, abs=1e-4)
        assert max(CLASSES, key=lambda c: float(r[c])) == r["pred"]
    # The same model, decoding and trainer precision as the training run's test report.
    for r in rows:
        if r["path"] in copied:
            assert r["pred"] == copied[r["path"]]["pred"]
            for c in CLASSES:
                assert float(r[c]) == pytest.approx(float(copied[r["path"]][c]), abs=0.02)
    bad = {
        Path(r["path"]).name: r["reason"] for r in csv.DictReader((out / "unreadable.csv").open())
    }
    assert bad == {
        "broken.jpg": "not an image (no known image format)",
        "empty.png": "empty file (0 bytes)",
    }
    assert "2 file(s) could not be read" in result.stdout

    one = inputs / "nested" / "1.jpeg"
    assert len(predict_here(tmp_path / "one", best_checkpoint(run), one)) == 1


@pytest.mark.slow
def test_tampered_checkpoint_is_refused(tampered, tmp_path, synthetic_cache) -> None:
    """By predict on the command line (one line, no traceback) and by resuming training."""
    ckpt, marker = tampered
    args = [f"ckpt_path={ckpt}", f"inputs={tmp_path}"]
    result = run_module("cellcls.predict", args, tmp_path, synthetic_cache)
    assert result.returncode != 0
    assert f"ckpt_path '{ckpt}' was refused" in result.stderr, result.stderr[-2000:]
    assert "posix.system" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(CellclsError, match=f"ckpt_path '{ckpt}' was refused.*posix.system"):
        train(compose_run([f"ckpt_path={ckpt}", "data=synthetic"], tmp_path / "resumed"))
    assert not marker.exists()


@pytest.mark.slow
def test_predict_with_an_ensemble(trained_run, tmp_path) -> None:
    """`ckpt_path=[A,B]`: each image's probabilities are the average of A's and B's."""
    run, _ = trained_run
    inputs = tmp_path / "new"
    inputs.mkdir()
    for k, row in enumerate(list(csv.DictReader((run / "predictions.csv").open()))[:6]):
        shutil.copy(row["path"], inputs / f"{k}{Path(row['path']).suffix}")
    ckpts = [best_checkpoint(run), run / "checkpoints" / "last.ckpt"]
    probs = []
    for name, ckpt in (("a", ckpts[0]), ("b", ckpts[1]), ("ab", f"[{ckpts[0]},{ckpts[1]}]")):
        rows = sorted(predict_here(tmp_path / name, ckpt, inputs), key=lambda r: r["path"])
        probs.append(torch.tensor([[float(r[c]) for c in CLASSES] for r in rows]))
    assert len(probs[2]) == 6 and not torch.allclose(probs[0], probs[1], atol=1e-4)
    torch.testing.assert_close(probs[2], (probs[0] + probs[1]) / 2, atol=2e-6, rtol=0)
