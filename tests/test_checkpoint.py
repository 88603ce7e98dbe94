"""One way to read a checkpoint: train (resuming), eval, predict and export all use `restore`."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from cellcls.core.errors import CellclsError
from cellcls.eval import evaluate
from cellcls.export import export
from cellcls.predict import predict
from cellcls.run.checkpoint import restore
from cellcls.train import train
from tests.conftest import CLASSES, best_checkpoint, compose_run


@pytest.fixture
def misfit(trained_run, tmp_path: Path) -> Path:
    """A real checkpoint whose saved config describes a wider network than its weights."""
    ckpt = torch.load(best_checkpoint(trained_run[0]), weights_only=True)
    ckpt["cellcls_config"]["model"]["net"]["hidden"] = 64
    torch.save(ckpt, tmp_path / "misfit.ckpt")
    return tmp_path / "misfit.ckpt"


@pytest.mark.slow
def test_restore(trained_run) -> None:
    path = best_checkpoint(trained_run[0])
    restored = restore(path, data=False)
    assert restored.datamodule is None and restored.model.classes == CLASSES
    state = restored.checkpoint["state_dict"]
    for key, value in restored.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert restored.config.data.image_size == 48 and restore(path).datamodule is not None


@pytest.mark.slow
def test_every_entry_point_refuses_weights_that_do_not_fit(misfit: Path, tmp_path: Path) -> None:
    message = f"checkpoint '{misfit}' does not fit the model built from its config"
    runs = {
        "train": lambda: train(compose_run([f"ckpt_path={misfit}"], tmp_path)),
        "eval": lambda: evaluate(compose_run([f"ckpt_path={misfit}"], tmp_path, "eval"), []),
        "predict": lambda: predict(
            compose_run([f"ckpt_path={misfit}", f"inputs={tmp_path}"], tmp_path, "predict"),
            tmp_path,
        ),
        "export": lambda: export(misfit, tmp_path / "export"),
    }
    for name, run in runs.items():
        with pytest.raises(CellclsError, match="does not fit") as err:
            run()
        assert str(err.value).startswith(message), name
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config_name", "given", "missing"),
    [
        ("eval", [], "ckpt_path"),
        ("predict", ["inputs=x"], "ckpt_path"),
        ("predict", ["ckpt_path=x"], "inputs"),
    ],
)
def test_required_settings(
    config_name: str, given: list[str], missing: str, tmp_path: Path
) -> None:
    cfg = compose_run(given, tmp_path, config_name)
    call = {"eval": lambda: evaluate(cfg, []), "predict": lambda: predict(cfg, tmp_path)}
    with pytest.raises(
        CellclsError, match=f"^{missing} is required: python -m cellcls.{config_name}"
    ):
        call[config_name]()


@pytest.mark.slow
def test_predict_runs_in_the_trainers_precision(trained_run, tmp_path: Path) -> None:
    """`precision=` reaches the model: bf16 rounds differently, within bf16's error."""
    run = trained_run[0]
    images = sorted({r["path"] for r in csv.DictReader((run / "predictions.csv").open())})[:6]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for k, image in enumerate(images):
        (inputs / f"{k}.jpeg").write_bytes(Path(image).read_bytes())
    probs = {}
    for precision in ("32-true", "bf16-mixed"):
        args = [f"ckpt_path={best_checkpoint(run)}", f"inputs={inputs}", "device=cpu"]
        out = tmp_path / precision
        predict(compose_run([*args, f"precision={precision}"], out, "predict"), out)
        rows = list(csv.DictReader((out / "predictions.csv").open()))
        probs[precision] = torch.tensor([[float(r[c]) for c in CLASSES] for r in rows])
    assert probs["32-true"].shape == (6, 4)
    assert not torch.equal(probs["32-true"], probs["bf16-mixed"])  # bf16 rounds differently
    assert torch.allclose(probs["32-true"], probs["bf16-mixed"], atol=0.05)
