"""`report.gradcam=true`: Grad-CAM heat maps (`gradcam.png`) for every `model=`, in the test
report of train and eval and in predict's folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch import nn

from cellcls.core.errors import CellclsError
from cellcls.eval import evaluate
from cellcls.predict import predict
from cellcls.reports.gradcam import gradcam_rows, target_layer, write_gradcam
from cellcls.run.callbacks import TestReport as Report  # (not a test class)
from cellcls.train import train
from tests.conftest import CLASSES, FAST, best_checkpoint, compose_run, options

SIZE = 32  # the last feature maps are 2x2
# The layer the rule in cellcls.reports.gradcam picks for the networks it names.
LAYERS = {
    "smallcnn": "features",
    "smallcnn_bn": "features",
    "resnet18": "layer4",
    "efficientnet_b0": "features",
    "convnext_tiny": "features",
}


@pytest.mark.parametrize("model", options("model"))
def test_gradcam_of_every_model(model: str, tmp_path: Path) -> None:
    cfg = compose_run([f"model={model}", "data=synthetic", f"data.image_size={SIZE}"], tmp_path)
    torch.manual_seed(0)
    module = instantiate(cfg.model, _convert_="object")
    # A trained head weighs its class's features up; random weights can make the evidence negative
    # everywhere, a map that Grad-CAM's ReLU leaves blank.
    head = [m for m in module.net.modules() if isinstance(m, nn.Linear)][-1]
    head.weight.data.abs_()
    images = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8)
    with torch.no_grad():  # the model's own predictions, as in a report; labels in turn
        probs = module.eval()(images).softmax(1).numpy()
    labels = np.arange(len(images)) % len(CLASSES)
    module.train()
    shown: list[int] = []

    def load(picked: list[int]) -> torch.Tensor:
        shown.extend(picked)
        return images[picked]

    maps, layer = write_gradcam(tmp_path / "gradcam.png", module, load, probs, CLASSES, labels, 1)
    assert layer == LAYERS.get(model, layer)
    assert shown and maps.shape == (len(shown), SIZE, SIZE)
    # Maps that show where, not constants (an untrained net's evidence for a class can still be
    # negative everywhere in an image, which Grad-CAM leaves blank).
    spread = maps.reshape(len(maps), -1).std(1)
    assert (spread > 0.01).mean() >= 0.5, spread
    assert maps.min() >= 0 and maps.max() <= 1
    with Image.open(tmp_path / "gradcam.png") as im:
        im.verify()
    # The model is left as it was: training mode, trainable weights, no gradients.
    assert module.training
    assert all(p.requires_grad and p.grad is None for p in module.parameters())


def test_the_layer_is_the_last_feature_map_of_any_network() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    assert target_layer(net, torch.rand(1, 3, 16, 16))[0] == "2"  # not the 1x1 pooled map
    with pytest.raises(CellclsError, match="report.gradcam=true needs a network"):
        target_layer(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.rand(1, 3, 2, 2))


def test_errors_first_then_each_class() -> None:
    probs = np.array(
        [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.95, 0.05], [0.45, 0.55]]
    )  # predicted 0, 1, 0, 1, 0, 1
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert gradcam_rows(probs, ["a", "b"], labels, 2) == [[4, 1], [0, 2], [3, 5]]
    assert gradcam_rows(probs, ["a", "b"], labels, 1) == [[4], [1], [0], [3]]
    assert gradcam_rows(probs, ["a", "b"], None, 2) == [[4, 0], [1, 3]]  # predict: no labels


def test_a_bad_setting_is_named() -> None:
    with pytest.raises(CellclsError, match="report.gradcam='yes' is not accepted"):
        Report("out", gradcam="yes")
    with pytest.raises(CellclsError, match="report.gradcam_per_class=0 is not accepted"):
        Report("out", gradcam=True, gradcam_per_class=0)


@pytest.mark.slow
def test_train_writes_gradcam_only_when_asked(in_tmp: Path) -> None:
    tiny = [*FAST, "data.n_train=8", "data.n_test=3", "data.image_size=32", "debug=fdr"]
    for asked in (True, False):
        run = in_tmp / f"run_{asked}"
        train(compose_run([*tiny, f"report.gradcam={str(asked).lower()}"], run))
        assert (run / "metrics.json").is_file()
        assert (run / "gradcam.png").is_file() == asked
    with Image.open(in_tmp / "run_True" / "gradcam.png") as im:
        im.verify()


@pytest.mark.slow
def test_eval_and_predict_write_gradcam(trained_run, in_tmp: Path) -> None:
    run, _ = trained_run
    assert (run / "metrics.json").is_file() and not (run / "gradcam.png").exists()  # default off
    ckpt, asked = f"ckpt_path={best_checkpoint(run)}", "report.gradcam=true"
    overrides = [ckpt, *(a for a in FAST if not a.startswith(("data=", "data.image"))), asked]
    evaluate(compose_run(overrides, in_tmp / "eval", "eval"), overrides)
    root = json.loads((run / "metrics.json").read_text())["root"]
    overrides = [ckpt, f"inputs={root}/TEST", "device=cpu", asked]
    predict(compose_run(overrides, in_tmp / "predict", "predict"), in_tmp / "predict")
    for out in ("eval", "predict"):
        with Image.open(in_tmp / out / "gradcam.png") as im:
            im.verify()
