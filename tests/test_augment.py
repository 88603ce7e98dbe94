"""augment=: random augmentation of training batches, per image, and nowhere else."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from cellcls.core.errors import CellclsError
from cellcls.models import BatchAugment, CellClassifier, SmallCNNBN
from cellcls.train import train
from tests.conftest import CLASSES, FAST, compose_run, last_value, make_dm


def augment(option: str, tmp_path: Path) -> BatchAugment:
    cfg = compose_run([f"augment={option}"], tmp_path)
    return instantiate(cfg.model.augment)


@pytest.mark.parametrize("option", ["light", "strong"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_keeps_shape_and_dtype(option: str, dtype: torch.dtype, tmp_path: Path) -> None:
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    x = x if dtype == torch.uint8 else x.float() / 255
    out = augment(option, tmp_path)(x)
    assert out.shape == x.shape and out.dtype == dtype
    assert not torch.equal(out, x)
    if dtype == torch.float32:
        assert out.min() >= 0 and out.max() <= 1


def test_draws_parameters_per_image(tmp_path: Path) -> None:
    torch.manual_seed(0)
    # One asymmetric image, 8 times: the same image everywhere unless each draw differs.
    one = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    one[..., 4:12, 6:20] = 255
    out = augment("light", tmp_path)(one.expand(8, -1, -1, -1).contiguous())
    different = {i for i in range(1, 8) if not torch.equal(out[i], out[0])}
    assert len(different) == 7


def test_flips_are_exact_and_drawn_per_image() -> None:
    """With only flips, the one resampling pass lands on pixel centres: every output is exactly
    one of the four flips of its input, and all four occur in one batch."""
    torch.manual_seed(0)
    x = torch.rand(64, 3, 20, 30)  # not square: the grid's aspect ratio is checked too
    out = BatchAugment(flips=True, degrees=0)(x)
    kinds = []
    for i in range(len(x)):
        views = (x[i], x[i].flip(-1), x[i].flip(-2), x[i].flip(-1, -2))
        errors = [(out[i] - v).abs().max().item() for v in views]
        assert min(errors) < 1e-5, errors
        kinds.append(errors.index(min(errors)))
    assert set(kinds) == {0, 1, 2, 3}
    assert torch.equal(BatchAugment(flips=False, degrees=0)(x), x)


def test_rotation_by_a_quarter_turn_is_rot90() -> None:
    """The affine map turns about the image centre: +-90 degrees are rot90 of the input."""
    torch.manual_seed(0)
    x = torch.rand(256, 3, 16, 16)
    out = BatchAugment(flips=False, degrees=90)(x)
    quarter = [
        i
        for i in range(len(x))
        if min((out[i] - x[i].rot90(k, (-2, -1))).abs().max() for k in (1, 3)) < 0.1
    ]
    assert 0 < len(quarter) < len(x)  # a few of the 256 angles lie within a degree of +-90


def test_colour_jitter_keeps_greys_grey() -> None:
    """Saturation and hue move colours about the grey axis; a grey image stays grey."""
    grey = torch.full((8, 3, 12, 12), 0.4)
    out = BatchAugment(flips=False, degrees=0, saturation=0.5, hue=0.3)(grey)
    torch.testing.assert_close(out, grey, atol=1e-5, rtol=0)
    coloured = torch.rand(8, 3, 12, 12)
    assert not torch.equal(BatchAugment(flips=False, degrees=0, hue=0.3)(coloured), coloured)


def test_default_is_light_and_none_is_no_module(tmp_path: Path) -> None:
    assert (
        compose_run([], tmp_path).model.augment
        == compose_run(["augment=light"], tmp_path).model.augment
    )
    for overrides in (["augment=none"], ["experiment=tutorial"], ["debug=overfit"]):
        assert compose_run(overrides, tmp_path).model.augment is None, overrides


def test_bad_setting_is_named() -> None:
    with pytest.raises(CellclsError, match=r"model.augment.degrees=400 is not accepted"):
        BatchAugment(degrees=400)


class Recorder(nn.Module):
    """An augmentation that inverts images and remembers what it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.clone())
        return 255 - x


class Inputs(L.Callback):
    """Record every batch's images and labels as the model receives them."""

    def __init__(self) -> None:
        self.batches: dict[str, list[tuple[Tensor, Tensor]]] = {}

    def _keep(self, stage: str, batch) -> None:
        x, y = batch if isinstance(batch, list | tuple) else (batch, None)
        self.batches.setdefault(stage, []).append((x.clone(), y))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._keep("train", batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dl=0) -> None:
        self._keep("val", batch)


@pytest.mark.slow
def test_applied_to_training_batches_only(tiny_root: Path) -> None:
    recorder, inputs = Recorder(), Inputs()
    model = CellClassifier(
        SmallCNNBN(widths=(8, 8)), partial(torch.optim.SGD, lr=0.01), CLASSES, augment=recorder
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[inputs],
    )
    dm = make_dm(tiny_root)
    trainer.fit(model, datamodule=dm)
    assert len(recorder.seen) == 2  # the 2 training batches, not the 1 + 2 validation ones
    for seen, (x, _) in zip(recorder.seen, inputs.batches["train"], strict=True):
        assert torch.equal(seen, x)  # the batch as loaded, on the device
    trainer.test(model, datamodule=dm)
    trainer.predict(model, dataloaders=dm.test_dataloader())
    assert len(recorder.seen) == 2


def test_training_step_sees_augmented_images_and_same_labels() -> None:
    seen = {}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x: Tensor) -> Tensor:
            seen["x"] = x
            return self.fc(x.mean((2, 3)))

    model = CellClassifier(Net(), partial(torch.optim.SGD, lr=0.01), CLASSES, augment=Recorder())
    model.mean.zero_()
    model.std.fill_(1)
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 3])
    model.training_step((x, y), 0)
    torch.testing.assert_close(seen["x"], (255 - x).float() / 255)
    model.eval()
    model.validation_step((x, y), 0)
    torch.testing.assert_close(seen["x"], x.float() / 255)


@pytest.mark.slow
def test_short_run_with_light_augmentation_learns(in_tmp: Path) -> None:
    args = [
        *FAST,
        "data.image_size=32",
        "data.n_train=60",
        "data.n_test=15",
        "model=smallcnn_bn",
        "augment=light",
        "trainer.max_epochs=5",
        "~callbacks.training_curves",
    ]
    metrics = train(compose_run(args, in_tmp / "run"))
    # 4 classes: chance is 0.25.
    assert metrics["test/acc"] > 0.5, metrics
    assert last_value(in_tmp / "run" / "csv" / "metrics.csv", "val/acc") > 0.5
