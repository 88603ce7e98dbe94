"""model=smallcnn_bn and the torchvision backbones: shapes, small-input stems, local weights.

Every model= option also runs a fast_dev_run step in tests/test_debug.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from hydra.utils import instantiate

from cellcls.core.errors import CellclsError
from cellcls.models import SmallCNNBN, torchvision_net
from cellcls.run.checkpoint import restore
from cellcls.train import train
from tests.conftest import FAST, compose_run


@pytest.mark.parametrize("size", [16, 32, 96])
def test_smallcnn_bn_takes_any_size(size: int) -> None:
    net = SmallCNNBN(num_classes=5).eval()
    assert net(torch.rand(2, 3, size, size)).shape == (2, 5)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "convnext_tiny"])
def test_small_input_halves_the_stem(name: str) -> None:
    x = torch.rand(1, 3, 64, 64)
    sizes = {}
    for small in (False, True):
        net = torchvision_net(name, num_classes=4, small_input=small).eval()
        assert net(x).shape == (1, 4)
        # The last feature map, before global pooling.
        body = (
            torch.nn.Sequential(*list(net.children())[:-2]) if name == "resnet18" else net.features
        )
        sizes[small] = body(x).shape[-1]
    assert sizes[True] == 2 * sizes[False]


def test_unknown_name_is_refused() -> None:
    with pytest.raises(CellclsError, match=r"model.net.name='resnet19' is not accepted"):
        torchvision_net("resnet19")


def saved_imagenet_like(tmp_path: Path, name: str = "resnet18") -> tuple[Path, dict]:
    """A 1000-class state dict as a user would save torchvision's pretrained one."""
    torch.manual_seed(1)
    state = torchvision.models.get_model(name, weights=None).state_dict()
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    return path, state


def test_weights_from_a_local_state_dict(tmp_path: Path, caplog) -> None:
    path, state = saved_imagenet_like(tmp_path)
    cfg = compose_run(["model=resnet18", f"model.net.weights={path}"], tmp_path / "run")
    with caplog.at_level("INFO"):
        model = instantiate(cfg.model, _convert_="object")
    loaded = model.net.state_dict()
    for key in ("conv1.weight", "layer4.1.bn2.running_var", "layer2.0.downsample.0.weight"):
        torch.testing.assert_close(loaded[key], state[key], check_layout=False)
    # The 1000-class head does not fit 4 classes: it keeps its new initialisation.
    assert loaded["fc.weight"].shape == (4, 512)
    assert "fc.weight, fc.bias" in caplog.text


def test_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    path, _ = saved_imagenet_like(tmp_path, "mobilenet_v3_small")
    with pytest.raises(CellclsError, match=r"model.net.weights='.*' does not fit"):
        torchvision_net("resnet18", weights=str(path))


def test_a_whole_model_pickle_is_refused(tmp_path: Path) -> None:
    """torch.save(model) pickles code; only state dicts load (weights_only=True)."""
    path = tmp_path / "model.pth"
    torch.save(torchvision.models.get_model("resnet18", weights=None), path)
    with pytest.raises(CellclsError, match=r"model.net.weights='.*' was refused"):
        torchvision_net("resnet18", weights=str(path))


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "does not exist"), (b"not a torch file", "is not a state dict saved with torch.save")],
)
def test_bad_weights_file_is_named(tmp_path: Path, content: bytes | None, match: str) -> None:
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CellclsError, match=rf"model.net.weights='{path}' {match}"):
        torchvision_net("resnet18", weights=str(path))


@pytest.mark.slow
def test_checkpoint_restores_without_the_weights_file(
    tmp_path: Path, synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint holds the trained weights; the pretrained file may be gone by eval time."""
    monkeypatch.setenv("CELLCLS_CACHE", str(synthetic_cache))
    monkeypatch.chdir(tmp_path)
    path, _ = saved_imagenet_like(tmp_path)
    args = [
        *FAST,
        "data.image_size=32",
        "data.n_train=8",
        "data.n_test=3",
        "model=resnet18",
        f"model.net.weights={path}",
        "trainer.max_epochs=1",
        "test=false",
        "~callbacks.training_curves",
    ]
    train(compose_run(args, tmp_path / "run"))
    path.unlink()
    restored = restore(tmp_path / "run" / "checkpoints" / "last.ckpt", data=False)
    assert restored.config.model.net.weights is None
    assert restored.checkpoint["cellcls_config"]["model"]["net"]["weights"] == str(path)
