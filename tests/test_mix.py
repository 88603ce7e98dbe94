"""mix=: MixUp and CutMix of training batches (torchvision.transforms.v2), and nowhere else."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn

from cellcls.models import CellClassifier
from cellcls.train import train
from tests.conftest import CLASSES, FAST, compose_run, last_value


def mix(option: str, tmp_path: Path):
    return instantiate(compose_run([f"mix={option}"], tmp_path).model.mix)


def test_off_by_default_and_in_every_experiment(tmp_path: Path) -> None:
    assert compose_run([], tmp_path).model.mix is None
    for experiment in ("tutorial", "best", "best_refit"):
        assert compose_run([f"experiment={experiment}"], tmp_path).model.mix is None


def test_mixup_blends_each_image_with_the_next_and_its_label_alike(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    out, target = mix("mixup", tmp_path)(x, y)
    assert out.shape == x.shape and target.shape == (6, len(CLASSES))
    torch.testing.assert_close(target.sum(1), torch.ones(6))
    onehot = F.one_hot(y, len(CLASSES)).float()
    lam = target[0, y[0]].item() if y[0] != y[-1] else None
    assert lam is not None and 0 < lam < 1
    # One weight per batch: image i is lam * x[i] + (1 - lam) * x[i - 1], and so is its label.
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.roll(1, 0))
    torch.testing.assert_close(target, lam * onehot + (1 - lam) * onehot.roll(1, 0))


def test_cutmix_pastes_a_box_of_the_next_image(tmp_path: Path) -> None:
    torch.manual_seed(1)
    x, y = torch.rand(4, 3, 20, 20), torch.tensor([0, 1, 2, 3])
    out, target = mix("cutmix", tmp_path)(x, y)
    pasted = (out != x).any(1)  # pixels taken from the previous image, per image
    assert pasted.any() and not pasted.all()
    torch.testing.assert_close(out[:, :, pasted[0]], x.roll(1, 0)[:, :, pasted[0]])
    # The label weight is the share of the box in the image.
    share = pasted[0].float().mean().item()
    assert target[0, 0].item() == pytest.approx(1 - share, abs=1e-6)
    assert target[0, 3].item() == pytest.approx(share, abs=1e-6)


class Recorder(nn.Module):
    """A network that remembers its input: the mean colour, then a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, len(CLASSES))
        self.seen: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.seen = x
        return self.fc(x.mean((2, 3)))


def test_training_step_trains_on_the_mixed_batch_only(tmp_path: Path) -> None:
    """The loss is taken against the blended labels of the blended images; validation, test
    and predict batches are not mixed."""
    torch.manual_seed(0)
    net = Recorder()
    model = CellClassifier(
        net, partial(torch.optim.SGD, lr=0.01), CLASSES, mix=mix("mixup", tmp_path)
    )
    model.mean.zero_()
    model.std.fill_(1)
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(5)
    loss = model.training_step((x, y), 0)
    torch.manual_seed(5)
    mixed, target = mix("mixup", tmp_path)(x.float() / 255, y)
    torch.testing.assert_close(net.seen, mixed)
    assert not torch.allclose(net.seen, x.float() / 255)
    torch.testing.assert_close(loss, F.cross_entropy(net.fc(mixed.mean((2, 3))), target))
    model.eval()
    for step in (model.validation_step, model.test_step):
        step((x, y), 0)
        torch.testing.assert_close(net.seen, x.float() / 255)
    model.predict_step(x, 0)
    torch.testing.assert_close(net.seen, x.float() / 255)


@pytest.mark.slow
def test_short_run_with_mixup_learns(in_tmp: Path) -> None:
    args = [
        *FAST,
        "data.image_size=32",
        "data.n_train=60",
        "data.n_test=15",
        "model=smallcnn_bn",
        "mix=mixup",
        "trainer.max_epochs=5",
        "~callbacks.training_curves",
    ]
    metrics = train(compose_run(args, in_tmp / "run"))
    assert metrics["test/acc"] > 0.5, metrics  # 4 classes: chance is 0.25
    assert last_value(in_tmp / "run" / "csv" / "metrics.csv", "val/acc") > 0.5
