"""Reading checkpoints safely (tensors and plain values only) and rebuilding their model.

`restore` is the one way the entry points read a checkpoint (or several, as an ensemble); the
functions above it are its steps.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from cellcls.core.errors import CellclsError
from cellcls.data.splits import HOLDOUT
from cellcls.models import CellClassifier, MeanProbabilities

# Where `cellcls.run.state.SaveConfig` puts the run's resolved data and model config.
CONFIG_KEY = "cellcls_config"
# ... and the grouped split's images and source cells (`ImageFolderDataModule.summary`).
DATA_KEY = "cellcls_data"
# Data settings the members of an ensemble must share: what their input images are ...
SAME_INPUT = ("classes", "image_size", "crop")
# ... and, to score the validation part of TRAIN (data.split=val), which cells it holds.
SAME_HOLDOUT = ("train_split", "val_fraction", "val_split", "folds", "fold", "seed")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True` on the CPU; bad files raise `CellclsError`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CellclsError(f"ckpt_path '{path}' does not exist (or is not a file).")
    if not zipfile.is_zipfile(path):
        raise CellclsError(
            f"ckpt_path '{path}' is not a readable checkpoint (not a torch.save file)."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).splitlines()
        # "Unsupported global: GLOBAL os.system ..." or "... unsupported GLOBAL posix.system ..."
        why = next((ln.strip() for ln in lines if "GLOBAL" in ln), lines[0][:200])
        raise CellclsError(
            f"ckpt_path '{path}' was refused: it holds more than tensors and plain values, and "
            f"loading it could run code from the file ({why})."
        ) from None
    except Exception as err:  # torch raises several types for files that are not checkpoints
        raise CellclsError(f"ckpt_path '{path}' is not a readable checkpoint: {err}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CellclsError(f"ckpt_path '{path}' is not a Lightning checkpoint (no state_dict).")
    return ckpt


def saved_config(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The data and model config stored in a cellcls checkpoint."""
    config = ckpt.get(CONFIG_KEY)
    if not isinstance(config, dict) or not {"data", "model"} <= config.keys():
        raise CellclsError(
            f"ckpt_path '{path}' was not written by cellcls.train (it holds no data and model "
            "config to rebuild the model from)."
        )
    return config


def load_weights(model: torch.nn.Module, ckpt: dict[str, Any], path: str | Path) -> None:
    """Load the checkpoint's weights into `model`; a model of another shape is a `CellclsError`."""
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CellclsError(
            f"checkpoint '{path}' does not fit the model built from its config and your "
            f"overrides (another architecture?): {str(err).splitlines()[1:2] or err}"
        ) from None
    hook = getattr(model, "on_load_checkpoint", None)
    if hook is not None:  # e.g. the record of which normalisation the buffers hold
        hook(ckpt)


def rebuild_config(cfg: DictConfig, saved: dict[str, Any], overrides: list[str]) -> DictConfig:
    """The checkpoint's data and model config, with the command line's `data.*`/`model.*` on top.

    A group choice (`data=synthetic`) replaces the saved group; `data.split` always comes from
    `cfg`, so eval scores the official TEST folder unless told otherwise.
    """
    out = OmegaConf.create({"data": saved["data"], "model": saved["model"]})
    keys = {"data.split"}
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in ("data", "model"):
            out[key] = OmegaConf.to_container(cfg[key], resolve=True)
        elif key.startswith(("data.", "model.")):
            keys.add(key)
    for key in sorted(keys):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        OmegaConf.update(out, key, value, merge=False)
    return out


@dataclass
class Restored:
    """A model rebuilt from a checkpoint with its weights loaded, and what it was rebuilt from."""

    model: L.LightningModule
    # The data and model config: the checkpoint's, with the command line's on top.
    config: DictConfig
    checkpoint: dict[str, Any]
    datamodule: L.LightningDataModule | None = None


def restore(
    path: str | Path | Sequence[str | Path],
    cfg: DictConfig | None = None,
    overrides: Sequence[str] = (),
    data: bool = True,
    ensemble: bool = False,
) -> Restored:
    """Rebuild the model (and with `data`, the datamodule) that a cellcls checkpoint was trained
    with, and load its weights: how train (resuming), eval, predict and export read checkpoints.

    With `cfg`, the command line's `data.*`/`model.*` settings (`overrides`) go on top of the
    saved ones (see `rebuild_config`); without it the saved config is used as it is. Every
    problem is a `CellclsError` that names the checkpoint: a file that is missing, not a
    checkpoint, or carries code, and settings the saved weights do not fit.

    With `ensemble`, `path` may be a list: the models are rebuilt one by one (the datamodule
    from the first) and averaged (see `ensemble_of`).
    """
    paths = [path] if isinstance(path, str | Path) else list(path)
    if len(paths) != 1 and not ensemble:
        raise CellclsError(f"ckpt_path={paths} is not accepted: give one checkpoint here.")
    if not paths:
        raise CellclsError("ckpt_path=[] is not accepted: give a checkpoint or a list of them.")
    if len(paths) > 1:
        members = [restore(p, cfg, overrides, data=data and not i) for i, p in enumerate(paths)]
        return ensemble_of(members, paths)
    path = paths[0]
    ckpt = load_checkpoint(path)
    saved = saved_config(ckpt, path)
    config = OmegaConf.create(saved) if cfg is None else rebuild_config(cfg, saved, overrides)
    if OmegaConf.select(config, "model.net.weights") is not None:
        # The checkpoint holds the trained weights: the pretrained file they started from (kept
        # in the checkpoint's config as a record) is neither read again nor needed.
        config.model.net.weights = None
    # Plain Python values (not OmegaConf containers) so checkpoints load with weights_only=True.
    datamodule = instantiate(config.data, _convert_="object") if data else None
    model: L.LightningModule = instantiate(config.model, _convert_="object")
    if list(model.classes) != list(config.data.classes):
        raise CellclsError(
            f"checkpoint '{path}' was trained for classes {list(model.classes)}, "
            f"but data.classes is {list(config.data.classes)}."
        )
    size = OmegaConf.select(config, "model.net.image_size")
    if size is not None and size != config.data.image_size:
        raise CellclsError(
            f"checkpoint '{path}' was trained on {size}x{size} images; "
            f"data.image_size={config.data.image_size} does not fit its network."
        )
    load_weights(model, ckpt, path)
    return Restored(model, config, ckpt, datamodule)


def ensemble_of(members: Sequence[Restored], paths: Sequence[str | Path]) -> Restored:
    """One model that averages the class probabilities of `members` (restored checkpoints),
    tested and predicted like a single one; the first member's data config and datamodule.

    The members must take the same images (`SAME_INPUT`); to score TRAIN's held-out cells they
    must also have held out the same ones (`SAME_HOLDOUT`), or some members would have trained
    on the images scored.
    """
    first = members[0].config.data
    keys = SAME_INPUT + (SAME_HOLDOUT if first.get("split") == HOLDOUT else ())
    for path, member in zip(paths[1:], members[1:], strict=True):
        for key in keys:
            mine, theirs = member.config.data.get(key), first.get(key)
            if mine != theirs:
                why = "the members must agree on it"
                if key in SAME_HOLDOUT:
                    why += " to score data.split=val, the cells they all held out"
                raise CellclsError(
                    f"ckpt_path: '{path}' was trained with data.{key}={mine}, but '{paths[0]}' "
                    f"with data.{key}={theirs}; {why}."
                )
    model = CellClassifier(
        MeanProbabilities([m.model for m in members]),
        optimizer=None,  # never trained as a whole
        classes=members[0].model.classes,
        mean=(0.0,),  # images reach the members in [0, 1]; each normalises them itself
        std=(1.0,),
    )
    return Restored(model, members[0].config, members[0].checkpoint, members[0].datamodule)
