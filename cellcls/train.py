"""`python -m cellcls.train`: config -> data + model + trainer; fit, then test the best model."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cellcls.callbacks import SaveConfig
from cellcls.errors import CellclsError, exit_on_user_error

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test as `cfg` says; return every metric the run logged."""
    L.seed_everything(cfg.seed, workers=True)
    # Plain Python values (not OmegaConf containers) so checkpoints load with weights_only=True.
    datamodule: L.LightningDataModule = instantiate(cfg.data, _convert_="object")
    model: L.LightningModule = instantiate(cfg.model, _convert_="object")
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    run_config = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "model")}
    callbacks.append(SaveConfig(run_config))
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.interrupted:
        log.warning("Training was interrupted; skipping the test phase.")
        return metrics

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if cfg.get("test"):
        if not best:
            log.warning("No best checkpoint was saved; testing the current weights.")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}

    log.info("Outputs: %s", Path(cfg.paths.output_dir).resolve())
    if best:
        log.info("Best checkpoint: %s", best)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the optimised metric for sweepers."""
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise CellclsError(
            f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)}"
        )
    return metrics[name]


if __name__ == "__main__":
    main()
