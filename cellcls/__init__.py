"""cellcls: white-blood-cell image classifiers with PyTorch Lightning and Hydra."""

from omegaconf import OmegaConf

# Configs derive numbers from lists (`${len:${data.classes}}`) instead of repeating them.
OmegaConf.register_new_resolver("len", len, replace=True)

__version__ = "0.1.0"
