"""The training recipe: tutorial defaults, recipe=modern (AdamW, per-batch schedule, label
smoothing), EMA and early-stopping callbacks, and test-time augmentation in eval and predict."""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn

from cellcls.core.errors import CellclsError
from cellcls.eval import evaluate
from cellcls.models import CellClassifier, SmallCNNBN
from cellcls.predict import predict
from cellcls.train import train
from tests.conftest import CLASSES, FAST, best_checkpoint, compose_run, make_dm

TINY = [
    *FAST,
    "data.n_train=8",
    "data.n_test=3",
    "data.image_size=32",
    "~callbacks.training_curves",
]


def test_smallcnn_keeps_the_tutorial_recipe(tmp_path: Path) -> None:
    cfg = compose_run(["augment=none"], tmp_path)  # the default's light augmentation aside
    assert cfg.model.get("scheduler") is None and cfg.model.augment is None
    model = instantiate(cfg.model, _convert_="object")
    assert model.label_smoothing == 0
    optimizer = model.configure_optimizers()  # a plain optimizer: no schedule
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.defaults["lr"] == 3e-4 and optimizer.defaults["weight_decay"] == 0


class LearningRates(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.total = trainer.estimated_stepping_batches

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.slow
def test_modern_recipe_steps_its_schedule_every_batch(in_tmp: Path) -> None:
    cfg = compose_run([*TINY, "recipe=modern", "data.batch_size=4", "trainer.max_epochs=2"], in_tmp)
    assert cfg.model.label_smoothing == 0.1
    lrs = LearningRates()
    train(cfg, extra_callbacks=[lrs])
    # A one-cycle over all the steps of both epochs: a new learning rate for every batch.
    assert len(lrs.lrs) == lrs.total >= 6 and len(set(lrs.lrs)) == lrs.total
    peak = lrs.lrs.index(max(lrs.lrs))
    assert 0 < peak < lrs.total - 1 and lrs.lrs[-1] < lrs.lrs[0]
    assert max(lrs.lrs) == pytest.approx(cfg.model.optimizer.lr, rel=0.1)


@pytest.mark.slow
def test_schedule_needs_a_finite_run(tiny_root: Path) -> None:
    model = CellClassifier(
        SmallCNNBN(widths=(8,)),
        partial(torch.optim.AdamW, lr=1e-3),
        CLASSES,
        scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-3),
    )
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, max_time={"seconds": 30}, logger=False)
    with pytest.raises(CellclsError, match="model.scheduler needs"):
        trainer.fit(model, datamodule=make_dm(tiny_root))


def test_label_smoothing_is_for_the_training_loss_only() -> None:
    torch.manual_seed(0)
    model = CellClassifier(
        SmallCNNBN(widths=(8,)), partial(torch.optim.AdamW), CLASSES, label_smoothing=0.2
    ).eval()
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 3])
    logits = model(x)
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer attached
        loss = model.training_step((x, y), 0)
        val_loss = model._step((x, y), "val")[0]
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, label_smoothing=0.2))
    torch.testing.assert_close(val_loss, F.cross_entropy(logits, y))
    with pytest.raises(CellclsError, match="model.label_smoothing=1.5 is not accepted"):
        CellClassifier(SmallCNNBN(), partial(torch.optim.AdamW), CLASSES, label_smoothing=1.5)


class Pooled(nn.Module):
    """Global average pooling and a linear layer: the same for every flip and 90° rotation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean((2, 3)))


def test_tta_averages_probabilities_over_flips_and_rotations() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    invariant = CellClassifier(Pooled(), partial(torch.optim.SGD, lr=0.1), CLASSES).eval()
    plain = invariant.predict_step(x, 0)
    invariant.tta = True
    torch.testing.assert_close(invariant.predict_step(x, 0), plain)

    model = CellClassifier(SmallCNNBN(widths=(8, 8)), partial(torch.optim.SGD), CLASSES).eval()
    model.tta = True
    probs = model.predict_step(x, 0)
    assert probs.shape == (5, 4)
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    views = [
        x.rot90(k, (2, 3)).flip(3) if f else x.rot90(k, (2, 3)) for k in range(4) for f in (0, 1)
    ]
    expected = torch.stack([model(v).softmax(1) for v in views]).mean(0)
    torch.testing.assert_close(probs, expected)
    model.tta = False
    assert not torch.allclose(model.predict_step(x, 0), probs)


@pytest.mark.slow
def test_eval_and_predict_with_tta(trained_run, in_tmp: Path) -> None:
    run, _ = trained_run
    ckpt = best_checkpoint(run)
    fast = [
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "callbacks.progress_bar.refresh_rate=0",
    ]
    scores = {}
    for tta in (False, True):
        out = in_tmp / f"eval-{tta}"
        cfg = compose_run([f"ckpt_path={ckpt}", f"tta={tta}", *fast], out, "eval")
        evaluate(cfg, [f"tta={tta}"])
        scores[tta] = json.loads((out / "metrics.json").read_text())
    assert scores[True]["n_images"] == scores[False]["n_images"]
    assert scores[True]["loss"] != pytest.approx(scores[False]["loss"])

    images = sorted(r["path"] for r in csv.DictReader((run / "predictions.csv").open()))[:6]
    cfg = compose_run(
        [
            f"ckpt_path={ckpt}",
            f"inputs={Path(images[0]).parent}",
            "tta=true",
            "device=cpu",
        ],
        in_tmp / "predict",
        "predict",
    )
    predict(cfg, in_tmp / "predict")
    rows = list(csv.DictReader((in_tmp / "predict" / "predictions.csv").open()))
    assert rows and all(
        sum(float(r[c]) for c in CLASSES) == pytest.approx(1, abs=1e-4) for r in rows
    )
    with pytest.raises(CellclsError, match="tta='yes' is not accepted"):
        evaluate(compose_run([f"ckpt_path={ckpt}", "tta=yes"], in_tmp / "bad", "eval"), [])


@pytest.mark.slow
def test_ema_checkpoints_hold_the_averaged_weights(in_tmp: Path) -> None:
    args = [*TINY, "model=smallcnn_bn", "callbacks=[default,ema]", "callbacks.ema.decay=0.9"]
    args += ["trainer.max_epochs=2", "callbacks.progress_bar.refresh_rate=0"]
    metrics = train(compose_run(args, in_tmp / "run"))
    assert "test/acc" in metrics
    ckpt = torch.load(in_tmp / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    averaged, current = ckpt["state_dict"], ckpt["current_model_state"]
    assert averaged.keys() == current.keys()
    assert not torch.equal(averaged["net.classifier.3.weight"], current["net.classifier.3.weight"])


@pytest.mark.slow
def test_early_stopping_on_val_acc(in_tmp: Path) -> None:
    args = [*TINY, "callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=1"]
    args += ["model.optimizer.lr=1e-9", "trainer.max_epochs=6", "test=false"]
    train(compose_run(args, in_tmp / "run"))
    last = torch.load(in_tmp / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] < 5  # val/acc cannot improve at lr 1e-9: stopped after 2 epochs


def test_balanced_class_weights_follow_the_training_images(tiny_root: Path, tmp_path: Path) -> None:
    """model.class_weights=balanced: n / (k * n_c) of the datamodule's training counts, in the
    training loss only; validation and test losses stay unweighted."""
    from types import SimpleNamespace

    from cellcls.models.recipe import balanced_weights

    assert torch.allclose(balanced_weights([90, 10]), torch.tensor([100 / 180, 100 / 20]))
    with pytest.raises(CellclsError, match="needs training images of every class"):
        balanced_weights([5, 0])
    cfg = compose_run([*TINY, "model.class_weights=balanced"], tmp_path)
    model: CellClassifier = instantiate(cfg.model)
    assert torch.equal(model.loss_weight, torch.ones(4))  # until the counts are known
    counts = [30, 10, 5, 55]
    dm = SimpleNamespace(class_counts=counts, statistics=None)
    model._trainer = SimpleNamespace(datamodule=dm)
    model.setup("fit")
    assert torch.allclose(model.loss_weight, balanced_weights(counts))
    assert "loss_weight" not in model.state_dict()  # old checkpoints load as before
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 2, 2])
    weighted = F.cross_entropy(logits, y, model.loss_weight)
    assert not torch.isclose(weighted, F.cross_entropy(logits, y))
    real_dm = make_dm(tiny_root)
    real_dm.setup("fit")
    assert sum(real_dm.class_counts) == len(real_dm.train_set) and min(real_dm.class_counts) > 0
    for bad in ("heavy", [1, 2]):
        with pytest.raises(CellclsError, match="must be null, balanced or 4 numbers > 0"):
            CellClassifier(SmallCNNBN(), partial(torch.optim.AdamW), CLASSES, class_weights=bad)
