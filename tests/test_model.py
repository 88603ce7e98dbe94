import pytest
import torch

from cellcls.core.errors import CellclsError
from cellcls.models import SmallCNN


def test_tutorial_parameter_count() -> None:
    net = SmallCNN(num_classes=4, image_size=200)
    assert sum(p.numel() for p in net.parameters()) == 10_250_788


@pytest.mark.parametrize(("size", "classes"), [(200, 4), (48, 4), (64, 7)])
def test_logits_shape(size: int, classes: int) -> None:
    net = SmallCNN(num_classes=classes, image_size=size)
    assert net(torch.rand(2, 3, size, size)).shape == (2, classes)


def test_keras_init_zero_bias_glorot_range() -> None:
    net = SmallCNN(image_size=48, init="keras")
    dense = net.classifier[1]
    fan_in, fan_out = dense.in_features, dense.out_features
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert torch.count_nonzero(dense.bias) == 0
    assert dense.weight.abs().max() <= bound
    assert dense.weight.abs().max() > 0.9 * bound  # glorot, not torch's smaller default


def test_unknown_init_rejected() -> None:
    with pytest.raises(CellclsError, match="model.net.init='xavier' is not accepted"):
        SmallCNN(init="xavier")


def test_classifier_normalises_inputs_and_keeps_stats_in_checkpoint() -> None:
    from functools import partial

    from cellcls.models import CellClassifier

    net = SmallCNN(image_size=32)
    model = CellClassifier(
        net,
        partial(torch.optim.Adam, lr=1e-3),
        classes=list("ABCD"),
        mean=[0.1, 0.2, 0.3],
        std=[0.5, 0.5, 0.25],
    )
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.5, 0.25]).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), net((x - mean) / std))
    state = model.state_dict()
    torch.testing.assert_close(state["std"], std)
    assert model.hparams.classes == list("ABCD")


def test_classifier_scales_uint8_like_float_in_unit_range() -> None:
    from functools import partial

    from cellcls.models import CellClassifier

    for channels_last in (False, True):
        torch.manual_seed(0)
        model = CellClassifier(
            SmallCNN(image_size=32),
            partial(torch.optim.Adam),
            list("ABCD"),
            channels_last=channels_last,
        )
        x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        torch.testing.assert_close(model(x), model(x.float() / 255), rtol=1e-4, atol=1e-5)
