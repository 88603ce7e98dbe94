"""`python -m cellcls.eval ckpt_path=PATH`: score a checkpoint (or, with `ckpt_path=[A,B,...]`, the
average of several) on a folder and write its report."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from cellcls.core.errors import require, require_given
from cellcls.run.checkpoint import restore
from cellcls.run.cli import entry

log = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    require_given(cfg, ["ckpt_path"], "python -m cellcls.eval ckpt_path=PATH")
    require(isinstance(cfg.tta, bool), "tta", cfg.tta, "true or false")


def evaluate(cfg: DictConfig, overrides: Sequence[str]) -> dict[str, float]:
    """Rebuild the checkpoint's model and data (a list of checkpoints: their ensemble), test it,
    and return the test metrics."""
    check(cfg)
    L.seed_everything(cfg.seed, workers=True)
    restored = restore(cfg.ckpt_path, cfg, overrides, ensemble=True)
    restored.model.tta = cfg.tta
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    (metrics,) = trainer.test(restored.model, datamodule=restored.datamodule)
    log.info("Report: %s", cfg.paths.output_dir)
    return metrics


@entry("eval", check)
def main(cfg: DictConfig) -> None:
    evaluate(cfg, HydraConfig.get().overrides.task)


if __name__ == "__main__":
    main()
