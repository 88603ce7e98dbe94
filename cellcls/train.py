"""`python -m cellcls.train`: config -> data + model + trainer; fit, then test the best model."""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from cellcls.core.errors import CellclsError, is_number, is_whole, require
from cellcls.core.hardware import reuse_freed_memory, uses_cuda
from cellcls.run.calibrate import calibrate_on_heldout
from cellcls.run.checkpoint import restore
from cellcls.run.cli import entry
from cellcls.run.state import RngState, SaveConfig

log = logging.getLogger(__name__)


def check_settings(cfg: DictConfig) -> None:
    """The settings train reads itself; data and model settings are checked where they are used."""
    require(is_whole(cfg.seed, 0), "seed", cfg.seed, "an integer >= 0")
    for key in ("max_epochs", "min_epochs"):
        value = cfg.trainer.get(key)
        require(
            value is None or is_whole(value, -1),
            f"trainer.{key}",
            value,
            "an integer (-1: no limit) or null",
        )
    if cfg.data.get("val_fraction") == 0:  # nothing is validated, so nothing can be chosen on val
        on_val = [
            f"callbacks.{name}.monitor={c.monitor}"
            for name, c in (cfg.get("callbacks") or {}).items()
            if c and str(c.get("monitor") or "").startswith("val/")
        ]
        if str(cfg.get("optimized_metric") or "").startswith("val/"):
            on_val.append(f"optimized_metric={cfg.optimized_metric}")
        require(
            not on_val,
            "data.val_fraction",
            0,
            "> 0 while " + ", ".join(on_val) + " choose on validation; to train on all of TRAIN "
            "use experiment=best_refit, or add callbacks.model_checkpoint.monitor=null "
            "optimized_metric=null trainer.limit_val_batches=0",
        )
    one_fold = not cfg.data.get("folds") or cfg.data.get("fold") is not None
    require(one_fold, "data.fold", None, "0 ... data.folds - 1 (null, every fold, is cellcls.cv's)")
    optimizer = cfg.model.get("optimizer") or {}
    for key, low in (("lr", "> 0"), ("weight_decay", ">= 0")):
        value = optimizer.get(key)
        ok = is_number(value) and (value > 0 if key == "lr" else value >= 0)
        require(value is None or ok, f"model.optimizer.{key}", value, f"a number {low}")
    check_gpu_settings(cfg)


# Precisions that train with a GradScaler (16-bit loss scaling).
SCALED = ("16-mixed", "16")


def check_gpu_settings(cfg: DictConfig) -> None:
    """Combinations that Lightning or PyTorch stop on only after the data is ready."""
    precision, clip = str(cfg.trainer.get("precision")), cfg.trainer.get("gradient_clip_val")
    fused = (cfg.model.get("optimizer") or {}).get("fused")
    if fused and clip and precision in SCALED:  # the scaler unscales inside a fused step
        raise CellclsError(
            f"model.optimizer.fused=true, trainer.precision={precision} and "
            f"trainer.gradient_clip_val={clip} do not go together: Lightning cannot clip the "
            "gradients of a fused optimizer under 16-bit loss scaling. Set "
            "model.optimizer.fused=false (or trainer.gradient_clip_val=null, or "
            "trainer.precision=bf16-mixed where the GPU has bf16)."
        )
    if cfg.trainer.get("deterministic") is True and uses_cuda(cfg.trainer.accelerator):
        raise CellclsError(
            "trainer.deterministic=true stops at the first backward pass on a GPU for every "
            "network with AdaptiveAvgPool2d (smallcnn_bn, resnet18, efficientnet_b0, "
            "convnext_tiny): it has no deterministic CUDA kernel. Use trainer.deterministic=warn "
            "(deterministic kernels wherever they exist, a warning where not)."
        )


def resume_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: `ckpt_path`, where `last` is this run folder's last.ckpt."""
    path = cfg.get("ckpt_path")
    if path != "last":
        return path
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise CellclsError(
            f"ckpt_path=last, but there is no '{last}'. Resume a run in its own folder: "
            "python -m cellcls.train ckpt_path=last hydra.run.dir=<the run's folder>"
        )
    return str(last)


def train(
    cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = (), resume: str | None = None
) -> dict[str, float]:
    """Fit and test as `cfg` says; return every metric the run logged.

    Resuming (`ckpt_path`), the data and model settings come from the checkpoint, with the
    command line's `data.*` and `model.*` on top, as in `cellcls.eval`. `extra_callbacks` join
    the config's (cellcls.search adds its pruning callback). `resume` is the command that an
    interruption names (cellcls.cv's own); by default, this run's `ckpt_path=last`.
    """
    check_settings(cfg)
    ckpt_path = resume_path(cfg)
    L.seed_everything(cfg.seed, workers=True)
    reuse_freed_memory()  # ~20% of a CPU step is page faults otherwise (see cellcls.core.hardware)
    if ckpt_path:  # refuses files that carry code, and weights that do not fit, before Lightning
        restored = restore(ckpt_path, cfg, HydraConfig.get().overrides.task)
        run, model, datamodule = restored.config, restored.model, restored.datamodule
    else:
        # Plain Python values (not OmegaConf containers): checkpoints load with weights_only=True.
        run = cfg
        datamodule = instantiate(cfg.data, _convert_="object")
        model = instantiate(cfg.model, _convert_="object")
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    run_config = {k: OmegaConf.to_container(run[k], resolve=True) for k in ("data", "model")}
    callbacks += [SaveConfig(run_config), RngState(cfg.seed), *extra_callbacks]
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    hparams = run_config | {
        "seed": cfg.seed,
        "trainer": OmegaConf.to_container(cfg.trainer, resolve=True),
    }
    for lg in loggers:  # the modules save theirs with logger=False: the run's config, once
        lg.log_hyperparams(hparams)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)

    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit as stop:  # how Lightning ends fit on Ctrl-C (code 1) and SIGTERM (none)
        if (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file():
            resume = resume or (
                "python -m cellcls.train ckpt_path=last hydra.run.dir="
                f"{Path(cfg.paths.output_dir).resolve()} (and the same trainer settings)"
            )
            log.warning("Training was interrupted. Resume it with: %s", resume)
        raise SystemExit(stop.code or 128 + signal.SIGTERM) from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not trainer.fast_dev_run:
        calibrate_on_heldout(trainer, model, datamodule, best)
    if cfg.get("test"):
        if not best and not trainer.fast_dev_run:  # fast_dev_run saves no checkpoints
            log.warning("No best checkpoint was saved; testing the current weights.")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}

    log.info("Outputs: %s", Path(cfg.paths.output_dir).resolve())
    if best:
        log.info("Best checkpoint: %s", best)
    return metrics


def check_ddp_launch(cfg: DictConfig) -> None:
    """Refuse `trainer=ddp` in a local multirun: Lightning starts the other processes by running
    the command line again, and each would start the whole sweep. SLURM starts them itself."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if cfg.trainer.get("strategy") == "ddp" and multirun and not SLURMEnvironment.detect():
        raise CellclsError(
            "trainer=ddp runs as a single run (python -m cellcls.train trainer=ddp ...), not in a "
            "local multirun (-m). Sweep DDP jobs on SLURM (hydra/launcher=slurm), or sweep "
            "single-device jobs."
        )


def check(cfg: DictConfig) -> None:
    """What `main` refuses before the config tree is printed."""
    check_settings(cfg)
    check_ddp_launch(cfg)


@entry("train", check)
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
