"""Every option of every config group composes, resolves and instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, compose_run, options

GROUPS = {
    group.name: options(group.name)
    for group in CONF_DIR.iterdir()
    # hparams_search belongs to the search config (tests/test_search.py).
    if group.is_dir() and group.name not in ("hydra", "hparams_search")
}
CASES = [(g, o) for g, opts in GROUPS.items() for o in opts]


def test_groups_found() -> None:
    assert {"data", "model", "trainer", "callbacks", "logger", "paths"} <= set(GROUPS)
    assert {"bloodcells", "synthetic"} <= set(GROUPS["data"])
    assert {"default", "cpu", "gpu"} <= set(GROUPS["trainer"])


@pytest.mark.parametrize(("group", "option"), CASES)
def test_option_composes_and_resolves(
    group: str, option: str, tmp_path: Path, tiny_root: Path
) -> None:
    # data=imagefolder discovers its classes: give it a dataset (Kaggle's layout, generated).
    found = [f"data.root={tiny_root}", "data.train_split=TRAIN", "data.split=TEST"]
    cfg = compose_run([f"{group}={option}", *found * (option == "imagefolder")], tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["net"]["num_classes"] == len(resolved["data"]["classes"]) == 4
    # Networks with global pooling (model=smallcnn_bn, resnet18, ...) take any image size.
    size = resolved["model"]["net"].get("image_size", resolved["data"]["image_size"])
    assert size == resolved["data"]["image_size"]
    assert resolved["model"]["classes"] == resolved["data"]["classes"]


@pytest.mark.parametrize("option", GROUPS["callbacks"])
def test_callbacks_instantiate(option: str, tmp_path: Path) -> None:
    cfg = compose_run([f"callbacks={option}"], tmp_path)
    for c in (cfg.callbacks or {}).values():
        assert instantiate(c) is not None


@pytest.mark.parametrize("option", GROUPS["logger"])
def test_loggers_write_into_run_folder(option: str, tmp_path: Path) -> None:
    cfg = compose_run([f"logger={option}"], tmp_path)
    for lg in cfg.logger.values():
        assert Path(instantiate(lg).log_dir).is_relative_to(tmp_path)


def test_model_follows_data_settings(tmp_path: Path) -> None:
    cfg = compose_run(["data.image_size=64", "data.classes=[A,B,C]"], tmp_path)
    model = instantiate(cfg.model, _convert_="object")
    assert model.classes == ["A", "B", "C"]
    assert model.net.classifier[-1].out_features == 3
    assert model.net.classifier[1].in_features == 32 * 16 * 16


def test_trainer_picks_device_automatically(tmp_path: Path) -> None:
    cfg = compose_run([], tmp_path)
    assert cfg.trainer.accelerator == "auto"
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.strategy.root_device.type in ("cpu", "cuda")
