"""model=timm and pretrained weights: local files (timm's and torchvision's), downloads through a
local stand-in of the hub, the weights' normalisation in the model and its checkpoint, and the
fine-tuning recipe's parameter groups (experiment=finetune).

Nothing here reaches a network: the hubs' caches are filled as a download would fill them, and
"no network" is the hub's offline mode (Hugging Face) or a failing `download_url_to_file`.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import constants as hub_constants
from hydra.utils import instantiate

from cellcls.core.errors import CellclsError, exit_on_user_error
from cellcls.models import timm_net, torchvision_net
from cellcls.models.backbone import IMAGENET_MEAN, IMAGENET_STD
from cellcls.models.recipe import head_of
from cellcls.run.checkpoint import restore
from cellcls.train import train
from tests.conftest import FAST, compose_run
from tests.test_networks import saved_imagenet_like

IMAGENET = {"normalization": "imagenet", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def saved_timm(tmp_path: Path, name: str, suffix: str = ".pth") -> tuple[Path, dict]:
    """The 1000-class ImageNet-shaped state dict of timm's `name`, as a user saves it
    (`torch.save`) or as timm's hub holds it (`.safetensors`)."""
    torch.manual_seed(1)
    state = timm.create_model(name, pretrained=False).state_dict()
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save(state, path)
    return path, state


def records_imagenet(model) -> None:
    assert {k: model.hparams[k] for k in IMAGENET} == IMAGENET
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(model.std.flatten(), torch.tensor(IMAGENET_STD))


def same_but_head(net: torch.nn.Module, state: dict, head: str) -> None:
    """`net` holds `state` everywhere but in its new 4-class head."""
    own = net.state_dict()
    others = [k for k in state if not k.startswith(head + ".")]
    assert len(others) == len(state) - 2
    for key in others:
        torch.testing.assert_close(own[key], state[key], check_layout=False, msg=key)
    assert own[f"{head}.weight"].shape[0] == 4 and state[f"{head}.weight"].shape[0] == 1000


@pytest.mark.parametrize(
    ("name", "suffix"),
    [("resnet10t", ".safetensors"), ("convnext_atto", ".pth"), ("efficientnet_b0", ".pth")],
)
def test_timm_weights_from_a_local_file(tmp_path: Path, name: str, suffix: str) -> None:
    path, state = saved_timm(tmp_path, name, suffix)
    overrides = ["model=timm", f"model.net.name={name}", f"model.net.weights={path}"]
    model = instantiate(compose_run(overrides, tmp_path / "run").model, _convert_="object")
    same_but_head(model.net, state, model.net.pretrained_cfg["classifier"])
    assert model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 4)
    records_imagenet(model)


def test_timm_from_scratch_keeps_the_data_statistics(tmp_path: Path) -> None:
    cfg = compose_run(
        ["data=synthetic", "model=timm", "model.net.name=resnet10t"], tmp_path / "run"
    )
    model = instantiate(cfg.model, _convert_="object")
    assert model.hparams.normalization == "data"
    assert model.hparams.mean == list(cfg.data.mean)
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(list(cfg.data.mean)))


def test_torchvision_weights_from_a_local_file_use_imagenet_statistics(tmp_path: Path) -> None:
    path, state = saved_imagenet_like(tmp_path)
    cfg = compose_run(["model=resnet18", f"model.net.weights={path}"], tmp_path / "run")
    model = instantiate(cfg.model, _convert_="object")
    same_but_head(model.net, state, "fc")
    records_imagenet(model)


def test_timm_small_input_halves_the_stem() -> None:
    x = torch.rand(1, 3, 64, 64)
    sizes = [
        timm_net("resnet10t", small_input=s).forward_features(x).shape[-1] for s in (False, True)
    ]
    assert sizes[1] == 2 * sizes[0]


@pytest.mark.parametrize(
    ("name", "weights", "match"),
    [
        ("resnet19t", None, r"model.net.name='resnet19t' is not accepted: a timm architecture"),
        ("resnet10t.bogus", None, r"model.net.name='resnet10t.bogus' is not accepted"),
        ("resnet10t", "c3_in1", r"model.net.weights='c3_in1' is not accepted: imagenet, c3_in1k,"),
        ("resnet10t", "missing.pth", r"model.net.weights='missing.pth' does not exist"),
    ],
)
def test_bad_timm_settings_are_one_line(name: str, weights: str | None, match: str) -> None:
    with pytest.raises(CellclsError, match=match):
        timm_net(name, weights=weights)


@pytest.mark.parametrize("model", ["resnet18", "timm", "timm-file"])
def test_a_key_the_network_does_not_take_is_named(tmp_path: Path, model: str) -> None:
    """experiment=best with another model carries smallcnn_bn's widths: one line naming the
    setting, not a TypeError from inside torchvision or timm."""
    overrides = ["experiment=best", "data=synthetic", f"model={model.split('-')[0]}"]
    if model == "timm-file":  # timm's offline weights path builds the network its own way
        path, _ = saved_timm(tmp_path, "resnet10t")
        overrides += ["model.net.name=resnet10t", f"model.net.weights={path}"]
    cfg = compose_run(overrides, tmp_path)
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(lambda: instantiate(cfg.model))()
    assert str(stop.value.code).startswith("error: model.net.widths is not a setting of "), stop
    assert "remove it (~model.net.widths)" in str(stop.value.code)


def test_timm_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    path, _ = saved_timm(tmp_path, "resnet10t")
    with pytest.raises(
        CellclsError, match=r"weights='.*resnet10t.pth' does not fit timm's resnet18"
    ):
        timm_net("resnet18", weights=str(path))


def hub_cache(root: Path, repo: str, file: Path) -> None:
    """Put `file` where huggingface_hub's cache keeps `repo`'s model.safetensors after a
    download: snapshots/<commit>/ and refs/main naming the commit."""
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / "model.safetensors").write_bytes(file.read_bytes())


def test_timm_imagenet_download_offline_and_from_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # no network
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CellclsError) as err:
        timm_net("resnet10t", weights="imagenet")
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.net.weights=imagenet needs a network")
    assert "timm.create_model('resnet10t', pretrained=True)" in message
    assert message.endswith("pass model.net.weights=PATH.")
    # What a download leaves in the cache: timm then loads it as the real service's file.
    path, state = saved_timm(tmp_path, "resnet10t", ".safetensors")
    hub_cache(tmp_path / "hub", "timm/resnet10t.c3_in1k", path)
    net = timm_net("resnet10t", weights="imagenet")
    same_but_head(net, state, "fc")
    assert net.normalization == {"name": "imagenet", **{k: IMAGENET[k] for k in ("mean", "std")}}


def test_torchvision_imagenet_download_offline_and_from_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(url: str, *args, **kwargs) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(
        CellclsError,
        match=r"^model.net.weights=imagenet needs a network .*"
        r"get_model\('resnet18', weights='IMAGENET1K_V1'\)",
    ):
        torchvision_net("resnet18", weights="imagenet")
    # torch.hub's cache, where the download would have put torchvision's file.
    path, state = saved_imagenet_like(tmp_path)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(path.read_bytes())
    net = torchvision_net("resnet18", weights="imagenet")
    same_but_head(net, state, "fc")
    assert net.normalization["name"] == "imagenet"


def test_finetune_groups_freeze_and_scale_the_backbone(tmp_path: Path) -> None:
    cfg = compose_run(["experiment=finetune", "model.net.name=resnet10t"], tmp_path / "run")
    model = instantiate(cfg.model, _convert_="object")
    backbone, head = model.parameter_groups()
    assert {id(p) for p in head["params"]} == {
        id(p) for p in model.net.get_classifier().parameters()
    }
    assert len(backbone["params"]) + 2 == len(list(model.net.parameters()))
    model.trainer = SimpleNamespace(estimated_stepping_batches=20, current_epoch=0)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lr = cfg.model.optimizer.lr
    assert [g["max_lr"] for g in optimizer.param_groups] == pytest.approx([lr / 10, lr])
    for _ in range(8):  # through the warm-up and past the peak: the ratio stays
        optimizer.step()
        scheduler.step()
        rates = [g["lr"] for g in optimizer.param_groups]
        assert rates[0] == pytest.approx(rates[1] / 10)
    for epoch in (0, 1):  # epoch 0: only the head learns
        model.trainer.current_epoch = epoch
        optimizer.zero_grad()
        model(torch.rand(2, 3, 32, 32)).sum().backward()
        model.on_after_backward()
        assert all((p.grad is None) == (epoch == 0) for p in backbone["params"])
        assert all(p.grad is not None for p in head["params"])


def test_torchvision_head_is_the_last_linear_layer() -> None:
    net = torchvision_net("efficientnet_b0")
    assert head_of(net) is net.classifier[1]


class EpochWeights(L.Callback):
    """The first convolution's weights and the optimiser's stepped tensors after each epoch."""

    def __init__(self) -> None:
        self.conv: list[torch.Tensor] = []
        self.stepped: list[int] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.conv.append(pl_module.net.conv1[0].weight.detach().clone())
        self.stepped.append(len(trainer.optimizers[0].state))


@pytest.mark.slow
def test_finetune_run_records_the_normalisation_in_its_checkpoint(
    tmp_path: Path, synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two epochs of experiment=finetune from a local file: in the first only the head learns,
    in the second the backbone too; the checkpoint says (and restores) ImageNet's
    normalisation."""
    monkeypatch.setenv("CELLCLS_CACHE", str(synthetic_cache))
    monkeypatch.chdir(tmp_path)
    path, state = saved_timm(tmp_path, "resnet10t")
    args = [
        *FAST,
        "data.image_size=32",
        "data.n_train=8",
        "data.n_test=3",
        "experiment=finetune",
        "model.net.name=resnet10t",
        f"model.net.weights={path}",
        "trainer.max_epochs=2",
        "test=false",
        "~callbacks.training_curves",
    ]
    seen = EpochWeights()
    train(compose_run(args, tmp_path / "run"), extra_callbacks=[seen])
    torch.testing.assert_close(seen.conv[0], state["conv1.0.weight"])
    assert not torch.equal(seen.conv[1], state["conv1.0.weight"])
    n = len(list(timm_net("resnet10t").parameters()))
    assert seen.stepped == [2, n]  # the head's weight and bias, then every parameter
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert {k: ckpt["hyper_parameters"][k] for k in IMAGENET} == IMAGENET
    # Rebuilt without the file: the buffers come from the checkpoint, and so does the record
    # when Lightning resumes from it (on_load_checkpoint).
    restored = restore(last, data=False)
    torch.testing.assert_close(restored.model.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    restored.model.on_load_checkpoint(ckpt)
    assert {k: restored.model.hparams[k] for k in IMAGENET} == IMAGENET
