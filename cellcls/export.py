"""`python -m cellcls.export ckpt_path=PATH [export.format=onnx]`: a model that leaves cellcls.

Writes, in the run folder: `model.safetensors` (tensors only, so loading it cannot run code),
`config.yaml` (the data and model settings that rebuild the network: `load_exported`), and the
model card, `metadata.json` and `model_card.md` (`cellcls.reports.card`). With
`export.format=onnx`, also `model.onnx`: a graph from a batch of uint8 RGB crops
(N x size x size x 3, any N) to class probabilities, with the scaling and normalisation inside,
checked against torch in onnxruntime before it is kept. `cellcls.load_classifier(folder)` runs
either (`backend="onnx"`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from cellcls.core.errors import CellclsError, require, require_given
from cellcls.models import UInt8Probabilities
from cellcls.reports.card import metadata as card_metadata
from cellcls.reports.card import read_json, write_card
from cellcls.run.checkpoint import DATA_KEY, restore
from cellcls.run.cli import entry

log = logging.getLogger(__name__)
WEIGHTS, CONFIG, ONNX, METADATA = "model.safetensors", "config.yaml", "model.onnx", "metadata.json"
FORMATS = ("safetensors", "onnx")
# onnxruntime's probabilities may differ from torch's by float rounding only.
ONNX_TOLERANCE = 1e-4


def export(ckpt_path: str | Path, out: Path, fmt: str = "safetensors") -> Path:
    """Write the export of a cellcls checkpoint into `out` (see the module's docstring)."""
    restored = restore(ckpt_path, data=False)  # the weights must fit the model they describe
    out.mkdir(parents=True, exist_ok=True)
    # safetensors stores plain contiguous tensors (channels-last weights are not).
    weights = {k: v.contiguous() for k, v in restored.model.state_dict().items()}
    save_file(weights, out / WEIGHTS, metadata={"format": "pt", "source": str(ckpt_path)})
    OmegaConf.save(restored.config, out / CONFIG)
    config = OmegaConf.to_container(restored.config, resolve=True)
    checkpoint = restored.checkpoint
    meta = card_metadata(ckpt_path, checkpoint, config, checkpoint.get(DATA_KEY))
    meta["files"] = [WEIGHTS, CONFIG]
    if fmt == "onnx":
        meta["onnx_max_difference"] = export_onnx(restored.model, config["data"]["image_size"], out)
        meta["files"].append(ONNX)
    write_card(out, meta)
    return out


def export_onnx(model: L.LightningModule, size: int, out: Path) -> float:
    """Write `out/model.onnx` and return the largest difference between onnxruntime's
    probabilities and torch's on random images; over `ONNX_TOLERANCE` it is refused."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise CellclsError(
            'export.format=onnx needs onnx, onnxscript and onnxruntime: pip install -e ".[onnx]"'
        ) from None
    from cellcls.inference import onnx_runner

    for name in ("onnxscript", "onnx_ir"):  # their graph passes log every step at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    graph = UInt8Probabilities(model.float()).eval()
    example = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch")
    with torch.inference_mode(False):
        torch.onnx.export(
            graph,
            (example,),
            str(out / ONNX),
            input_names=["images"],
            output_names=graph.names,
            dynamic_shapes={"images": {0: batch}},
            dynamo=True,
            external_data=False,  # one file: the weights inside model.onnx (a model < 2 GB)
            verbose=False,
        )
    images = np.random.default_rng(0).integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = graph(torch.from_numpy(images))
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = onnx_runner(out / ONNX, torch.device("cpu"))(images)
    # Each output against torch's, relative to its scale (a Mahalanobis distance is ~100s).
    difference = max(
        float(np.abs(g - e.numpy()).max() / max(1.0, float(e.abs().max())))
        for g, e in zip(got.values(), expected, strict=True)
    )
    if difference > ONNX_TOLERANCE:
        (out / ONNX).unlink()
        raise CellclsError(
            f"the ONNX graph's probabilities differ from torch's by {difference:.2g} "
            f"(over {ONNX_TOLERANCE}): {ONNX} was not kept."
        )
    log.info("model.onnx: onnxruntime matches torch to %.1g on 5 random images", difference)
    return difference


def exported_config(folder: Path) -> DictConfig:
    """The data and model config of an export folder; a folder that is none is refused."""
    if not (folder / CONFIG).is_file():
        raise CellclsError(f"'{folder}' holds no {CONFIG} (made by python -m cellcls.export).")
    return OmegaConf.load(folder / CONFIG)


def read_metadata(folder: Path) -> dict[str, Any]:
    """An export's metadata.json (its model card's facts), or {} for an older export."""
    return read_json(folder / METADATA) or {}


def load_exported(folder: str | Path) -> L.LightningModule:
    """The model an export describes, with its weights, ready for `model.eval()`."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        raise CellclsError(f"'{folder}' holds no {WEIGHTS} (made by python -m cellcls.export).")
    model: L.LightningModule = instantiate(exported_config(folder).model, _convert_="object")
    model.load_state_dict(load_file(folder / WEIGHTS))
    model.trust = read_metadata(folder).get("trust")  # its calibration: not a weight
    return model


def check(cfg: DictConfig) -> None:
    require_given(cfg, ["ckpt_path"], "python -m cellcls.export ckpt_path=PATH")
    fmt = cfg.export.format
    require(fmt in FORMATS, "export.format", fmt, " or ".join(FORMATS))


@entry("export", check)
def main(cfg: DictConfig) -> None:
    check(cfg)
    out = export(cfg.ckpt_path, Path(cfg.paths.output_dir), cfg.export.format)
    log.info("Exported to %s: %s", out, ", ".join(p.name for p in sorted(out.iterdir())))


if __name__ == "__main__":
    main()
