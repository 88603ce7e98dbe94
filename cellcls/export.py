"""`python -m cellcls.export ckpt_path=PATH`: the weights as safetensors, and the model's config.

A safetensors file holds tensors only, so loading it cannot run code; `config.yaml` holds the
data and model settings of the run, enough to rebuild the network (`load_exported`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from cellcls.checkpoint import load_checkpoint, saved_config
from cellcls.errors import CellclsError, exit_on_user_error

log = logging.getLogger(__name__)
WEIGHTS, CONFIG = "model.safetensors", "config.yaml"


def export(ckpt_path: str | Path, out: Path) -> Path:
    """Write `out/model.safetensors` and `out/config.yaml` from a cellcls checkpoint."""
    ckpt = load_checkpoint(ckpt_path)
    config = saved_config(ckpt, ckpt_path)
    out.mkdir(parents=True, exist_ok=True)
    # safetensors stores plain contiguous tensors (channels-last weights are not).
    weights = {k: v.contiguous() for k, v in ckpt["state_dict"].items()}
    save_file(weights, out / WEIGHTS, metadata={"format": "pt", "source": str(ckpt_path)})
    OmegaConf.save(OmegaConf.create(config), out / CONFIG)
    return out


def load_exported(folder: str | Path) -> L.LightningModule:
    """The model an export describes, with its weights, ready for `model.eval()`."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise CellclsError(f"'{folder}' holds no {WEIGHTS} and {CONFIG} (made by cellcls.export).")
    config = OmegaConf.load(folder / CONFIG)
    model: L.LightningModule = instantiate(config.model, _convert_="object")
    model.load_state_dict(load_file(folder / WEIGHTS))
    return model


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise CellclsError("ckpt_path is required: python -m cellcls.export ckpt_path=PATH")
    out = export(cfg.ckpt_path, Path(HydraConfig.get().runtime.output_dir))
    log.info("Exported %s and %s to %s", WEIGHTS, CONFIG, out)


if __name__ == "__main__":
    main()
