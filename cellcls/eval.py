"""`python -m cellcls.eval ckpt_path=PATH`: score a checkpoint on a folder and write its report."""

from __future__ import annotations

import logging

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cellcls.checkpoint import load_checkpoint, load_weights, rebuild_config, saved_config
from cellcls.errors import CellclsError, exit_on_user_error

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig, overrides: list[str]) -> dict[str, float]:
    """Rebuild the checkpoint's model and data, test it, and return the test metrics."""
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise CellclsError("ckpt_path is required: python -m cellcls.eval ckpt_path=PATH")
    L.seed_everything(cfg.seed, workers=True)
    ckpt = load_checkpoint(cfg.ckpt_path)
    run = rebuild_config(cfg, saved_config(ckpt, cfg.ckpt_path), overrides)
    datamodule: L.LightningDataModule = instantiate(run.data, _convert_="object")
    model: L.LightningModule = instantiate(run.model, _convert_="object")
    if list(model.classes) != list(datamodule.classes):
        raise CellclsError(
            f"checkpoint '{cfg.ckpt_path}' was trained for classes {list(model.classes)}, "
            f"but data.classes is {list(datamodule.classes)}."
        )
    size = OmegaConf.select(run, "model.net.image_size")
    if size is not None and size != run.data.image_size:
        raise CellclsError(
            f"checkpoint '{cfg.ckpt_path}' was trained on {size}x{size} images; "
            f"data.image_size={run.data.image_size} does not fit its network."
        )
    load_weights(model, ckpt, cfg.ckpt_path)

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    (metrics,) = trainer.test(model, datamodule=datamodule)
    log.info("Report: %s", HydraConfig.get().runtime.output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
