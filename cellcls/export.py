"""`python -m cellcls.export ckpt_path=PATH`: the weights as safetensors, and the model's config.

A safetensors file holds tensors only, so loading it cannot run code; `config.yaml` holds the
data and model settings of the run, enough to rebuild the network (`load_exported`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from cellcls.core.errors import CellclsError, require_given
from cellcls.run.checkpoint import restore
from cellcls.run.cli import entry

log = logging.getLogger(__name__)
WEIGHTS, CONFIG = "model.safetensors", "config.yaml"


def export(ckpt_path: str | Path, out: Path) -> Path:
    """Write `out/model.safetensors` and `out/config.yaml` from a cellcls checkpoint."""
    restored = restore(ckpt_path, data=False)  # the weights must fit the model they describe
    out.mkdir(parents=True, exist_ok=True)
    # safetensors stores plain contiguous tensors (channels-last weights are not).
    weights = {k: v.contiguous() for k, v in restored.model.state_dict().items()}
    save_file(weights, out / WEIGHTS, metadata={"format": "pt", "source": str(ckpt_path)})
    OmegaConf.save(restored.config, out / CONFIG)
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


@entry("export")
def main(cfg: DictConfig) -> None:
    require_given(cfg, ["ckpt_path"], "python -m cellcls.export ckpt_path=PATH")
    out = export(cfg.ckpt_path, Path(cfg.paths.output_dir))
    log.info("Exported %s and %s to %s", WEIGHTS, CONFIG, out)


if __name__ == "__main__":
    main()
