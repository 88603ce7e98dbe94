"""cellcls: white-blood-cell image classifiers with PyTorch Lightning and Hydra."""

from omegaconf import OmegaConf

# Configs derive numbers from lists (`${len:${data.classes}}`) instead of repeating them.
OmegaConf.register_new_resolver("len", len, replace=True)


def _auto_precision(accelerator: str) -> str:
    from cellcls.hardware import auto_precision  # imports torch: only when a config asks

    return auto_precision(accelerator)


# `precision: ${auto_precision:${trainer.accelerator}}` picks bf16/16-mixed or 32-true.
OmegaConf.register_new_resolver("auto_precision", _auto_precision, replace=True)

__version__ = "0.1.0"
