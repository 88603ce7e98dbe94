"""The Python API: a trained model as a function of images.

    from cellcls import load_classifier
    clf = load_classifier("outputs/train/runs/<run>/checkpoints/epoch_004.ckpt")
    result = clf.predict("cell.jpeg")
    result.label, result.probabilities["MONOCYTE"], result.box

`load_classifier` takes a checkpoint (or a list of them: their ensemble) or a folder written by
`cellcls.export`; with `backend="onnx"`, the export's `model.onnx` runs in onnxruntime.
`Classifier.predict` takes paths, folders, PIL images and HxWx3 uint8 arrays, and applies the
preprocessing of training (`cellcls.data.decode.cut_cell`: 8-bit RGB, the white-cell crop,
the resize); the network scales and normalises its uint8 input itself (in the ONNX graph too).
`cellcls.predict` is this API on a folder.

Over 300 lines: the one inference path (inputs, batching, prediction sets and abstention, the
torch and ONNX runners, loading) in one place, so that predict, eval, export and the app share it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from cellcls.core.errors import CellclsError, is_level
from cellcls.core.hardware import auto_precision, reuse_freed_memory
from cellcls.core.images import open_image
from cellcls.data.decode import Cell, cpu_count, cut_cell, unreadable
from cellcls.data.layout import find_images
from cellcls.reports.ood import ood_threshold
from cellcls.reports.trust import abstain_threshold, prediction_sets, set_thresholds

log = logging.getLogger(__name__)

# One image: a file, an opened PIL image, or an H x W x 3 uint8 RGB array.
ImageInput = Union[str, Path, Image.Image, np.ndarray]  # noqa: UP007 (a runtime alias)
# Autocast dtypes of Lightning's precision names; "32-true" runs without autocast.
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "32-true": None}
BACKENDS = ("torch", "onnx")
# A batch of preprocessed uint8 images to `probs` (and the OOD scores, `cellcls.models.ood`).
Runner = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Prediction:
    """One image's result. An image that could not be read has `label` None and its `error`."""

    source: str | None  # the file, or None for an image given in memory
    label: str | None
    probabilities: dict[str, float] = field(default_factory=dict)
    box: tuple[int, int, int, int] | None = None  # the crop: left, top, right, bottom (or None)
    cell_found: bool = True  # False: no white cell was found and the centre was cropped
    error: str | None = None
    # With `coverage`: the classes that hold the true one at that level (conformal, on held-out
    # cells); with `abstain`: whether the top probability is below the confidence that gave that
    # accuracy on held-out cells. None where not asked.
    set: tuple[str, ...] | None = None
    unsure: bool | None = None
    # With `ood`: whether the image is unlike the training images (its `ood_score` above the
    # threshold that flags that share of held-out cells). None where not asked.
    ood: bool | None = None
    ood_score: float | None = None


class Classifier:
    """A model and the preprocessing it was trained with; `predict` is the whole pipeline.

    `run` maps a batch of preprocessed images (N x size x size x 3 uint8) to class
    probabilities (`probs`: N x classes, calibrated by the model's temperature) and, where the
    model has a fitted OOD flag, its scores (`cellcls.models.ood`); `model` is the torch
    module behind it (None for ONNX); `trust` the held-out evidence of the checkpoint
    (`cellcls.reports.trust`) that prediction sets and abstention are read from.
    """

    def __init__(
        self,
        run: Runner,
        classes: Sequence[str],
        image_size: int,
        crop: float | None,
        backend: str,
        device: str = "cpu",
        model: torch.nn.Module | None = None,
        metadata: dict[str, Any] | None = None,
        trust: dict[str, Any] | None = None,
    ) -> None:
        self.run, self.classes = run, list(classes)
        self.image_size, self.crop = image_size, crop
        self.backend, self.device, self.model = backend, device, model
        self.metadata, self.trust = metadata or {}, trust

    def __repr__(self) -> str:
        return (
            f"Classifier({self.classes}, image_size={self.image_size}, crop={self.crop}, "
            f"backend={self.backend}, device={self.device})"
        )

    def cells(self, images: Sequence[ImageInput]) -> list[Cell | str]:
        """Each image as the model sees it (`Cell`), or why it could not be read; on all cores
        (PIL and OpenCV release the GIL)."""
        with ThreadPoolExecutor(cpu_count()) as pool:
            return list(pool.map(self._cell, images))

    def _cell(self, image: ImageInput) -> Cell | str:
        try:
            if isinstance(image, str | Path):
                with open_image(image) as im:
                    return cut_cell(im, self.image_size, self.crop)
            if isinstance(image, np.ndarray):
                image = array_image(image)
            return cut_cell(image, self.image_size, self.crop)
        except Exception as err:  # PIL raises many types for broken files
            return unreadable(str(image) if isinstance(image, str | Path) else "", err)

    def outputs(self, batch: np.ndarray, tta: bool = False) -> dict[str, np.ndarray]:
        """`probs` of preprocessed images (N x size x size x 3 uint8) and the OOD scores where
        fitted; with `tta`, the probabilities are averaged over the 8 flips and 90-degree
        rotations, as `CellClassifier.scores` does (the scores stay the image's own)."""
        out = self.run(batch)
        if tta:
            views = [np.rot90(batch, k, axes=(1, 2)) for k in range(4)]
            views += [v[:, :, ::-1] for v in views]
            rest = [self.run(np.ascontiguousarray(v))["probs"] for v in views[1:]]
            out["probs"] = np.mean([out["probs"], *rest], axis=0)
        return out

    def probabilities(self, batch: np.ndarray, tta: bool = False) -> np.ndarray:
        """Class probabilities of preprocessed images (`outputs`)."""
        return self.outputs(batch, tta)["probs"]

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        batch_size: int = 64,
        tta: bool = False,
        progress: bool = False,
        coverage: float | None = None,
        mondrian: bool = False,
        abstain: float | None = None,
        ood: float | None = None,
    ) -> Prediction | list[Prediction]:
        """One `Prediction` for one image; a list for a folder (its images, sorted) or a list.

        `coverage` (0.9, 0.95): each result's `set` of classes, which holds the true class with
        that probability for a new cell (class by class with `mondrian`); `abstain` (an
        accuracy, 0.95): `unsure` marks the images whose top probability is below the one that
        gave that accuracy on held-out cells; `ood` (a rate, 0.05): `ood` flags the images unlike
        the training images, at a threshold that flags that share of held-out cells. All need a
        calibrated checkpoint (`trust`)."""
        single = not isinstance(images, list | tuple) and not (
            isinstance(images, str | Path) and Path(images).is_dir()
        )
        doubt = self._doubt(coverage, mondrian, abstain, tta, ood)
        items = self._expand(images)
        batches = self._batches(items, batch_size, tta, progress, doubt)
        results = [p for batch in batches for p in batch]
        return results[0] if single else results

    def _doubt(
        self,
        coverage: float | None,
        mondrian: bool,
        abstain: float | None,
        tta: bool,
        ood: float | None = None,
    ) -> tuple[np.ndarray | None, float | None, float | None]:
        """The per-class set thresholds, the abstention and OOD thresholds asked for (or None)."""
        if coverage is None and abstain is None and ood is None:
            return None, None, None
        for name, value in (("coverage", coverage), ("abstain", abstain), ("ood", ood)):
            if value is not None and not is_level(value):
                raise CellclsError(f"{name}={value!r} is not accepted: give a level in (0, 1).")
        if not self.trust:
            raise CellclsError(
                "coverage=, abstain= and ood= need a checkpoint calibrated on held-out cells, and "
                "this one has none (an ensemble, an older checkpoint, or a run without "
                "data.val_split=grouped): train it again, or leave them out."
            )
        if tta:
            log.warning("tta: sets and abstention were calibrated without TTA; approximate.")
        thresholds = None if coverage is None else set_thresholds(self.trust, coverage, mondrian)
        confident = None if abstain is None else abstain_threshold(self.trust, abstain)
        if ood is None:
            return thresholds, confident, None
        if "ood" not in self.trust:
            raise CellclsError(
                "ood= needs a checkpoint whose OOD flag was fitted on held-out cells (trained "
                "by this version, with data.val_split=grouped; not an ensemble or a conformal= "
                "file): train it again, or leave ood out."
            )
        return thresholds, confident, ood_threshold(self.trust["ood"], ood)

    def _expand(self, images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
        if isinstance(images, list | tuple):
            return [i for image in images for i in self._expand(image)]
        if isinstance(images, str | Path):
            path = Path(images).expanduser()
            if not path.exists():
                raise CellclsError(f"image '{path}' does not exist (give an image or a folder).")
            return list(find_images(path)) if path.is_dir() else [str(path)]
        if isinstance(images, Image.Image | np.ndarray):
            return [images]
        raise CellclsError(
            f"cannot classify a {type(images).__name__}: give a path, a folder, a PIL image, an "
            "H x W x 3 uint8 array, or a list of them."
        )

    def _batches(
        self,
        items: list[ImageInput],
        batch_size: int,
        tta: bool,
        progress: bool,
        doubt: tuple[np.ndarray | None, float | None, float | None] = (None, None, None),
    ) -> Iterator[list[Prediction]]:
        thresholds, confident, unlike = doubt
        bar = tqdm(total=len(items), desc="predicting", unit="img", disable=not progress)
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            cells = self.cells(chunk)
            good = [i for i, c in enumerate(cells) if isinstance(c, Cell)]
            outputs = (
                self.outputs(np.stack([cells[i].image for i in good]), tta)
                if good
                else {"probs": np.empty((0, len(self.classes)))}
            )
            score = None
            if unlike is not None and good:
                score = outputs.get(self.trust["ood"]["score"])  # type: ignore[index]
                if score is None:
                    raise CellclsError(
                        "ood=: this model's graph has no OOD scores (exported before they were "
                        "fitted): export it again, or leave ood out."
                    )
            out: list[Prediction] = []
            row, scores = iter(outputs["probs"]), iter(score if score is not None else [])
            for item, cell in zip(chunk, cells, strict=True):
                source = str(item) if isinstance(item, str | Path) else None
                if isinstance(cell, str):
                    out.append(Prediction(source, None, error=cell))
                    continue
                p = next(row)
                members = None
                if thresholds is not None:
                    member = prediction_sets(p[None], thresholds)[0]
                    members = tuple(c for c, m in zip(self.classes, member, strict=True) if m)
                out.append(
                    Prediction(
                        source,
                        self.classes[int(p.argmax())],
                        dict(zip(self.classes, map(float, p), strict=True)),
                        cell.box,
                        cell.found,
                        set=members,
                        unsure=None if confident is None else bool(p.max() < confident),
                        **self._flag(next(scores, None), unlike),
                    )
                )
            bar.update(len(chunk))
            yield out
        bar.close()

    @staticmethod
    def _flag(score: float | None, threshold: float | None) -> dict[str, Any]:
        if score is None or threshold is None:
            return {}
        return {"ood": bool(score > threshold), "ood_score": float(score)}


def array_image(array: np.ndarray) -> Image.Image:
    """An H x W x 3 uint8 RGB array (or H x W grey) as a PIL image; anything else is refused."""
    rgb = array.ndim == 3 and array.shape[2] == 3
    if array.dtype != np.uint8 or not (rgb or array.ndim == 2):
        raise CellclsError(
            f"an image array must be H x W x 3 (RGB) or H x W, uint8; got {array.shape} "
            f"{array.dtype}."
        )
    return Image.fromarray(array)


def resolve_device(device: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; otherwise a torch device name."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise CellclsError(f"device={device} is not a device: give auto, cpu or cuda.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CellclsError(f"device={device}, but this machine has no CUDA GPU: give auto or cpu.")
    return resolved


def torch_runner(model: torch.nn.Module, device: torch.device, precision: str) -> Runner:
    """A batch of uint8 NHWC images to the model's own `outputs`: probabilities, and the OOD
    scores once fitted."""
    if precision == "auto":
        precision = auto_precision(device.type)
    if precision not in AUTOCAST:
        raise CellclsError(f"precision={precision} is not one of auto, {', '.join(AUTOCAST)}.")
    dtype = AUTOCAST[precision]
    model.eval().to(device)
    if device.type == "cpu":  # 3.5x on smallcnn here: no page faults per batch, as in training
        reuse_freed_memory()

    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)
        autocast = torch.autocast(device.type, dtype) if dtype is not None else nullcontext()
        with torch.inference_mode(), autocast:
            out = model.outputs(x)
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    return run


def onnx_runner(file: Path, device: torch.device) -> Runner:
    """A batch of uint8 NHWC images to probabilities (and the OOD scores where the graph has
    them) with onnxruntime (the `[onnx]` extra)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise CellclsError(
            'backend=onnx needs onnxruntime, which is not installed: pip install -e ".[onnx]"'
        ) from None
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_count()
    session = ort.InferenceSession(str(file), options, providers=providers)
    name = session.get_inputs()[0].name
    outputs = ["probs" if o.name == "probabilities" else o.name for o in session.get_outputs()]

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(outputs, session.run(None, {name: batch}), strict=True))

    return run


def load_classifier(
    path: str | Path | Sequence[str | Path],
    device: str = "auto",
    precision: str = "auto",
    backend: str = "torch",
    conformal: str | Path | None = None,
) -> Classifier:
    """The classifier in a checkpoint (a list of them: their ensemble) or an export folder.

    `device` (auto, cpu, cuda, cuda:1) and `precision` (auto: bf16 where the hardware has it, as
    in training; or 32-true, bf16-mixed, 16-mixed) apply to the torch backend; `backend="onnx"`
    runs an export's model.onnx in onnxruntime (float32, on the GPU where onnxruntime-gpu is).
    `conformal`: a `cellcls.cv` run's conformal.json, whose out-of-fold cells then calibrate the
    prediction sets and abstention instead of the checkpoint's own held-out cells (the fold
    ensemble's, or a refit's); the probabilities keep the model's own temperature.
    """
    from cellcls.export import ONNX, WEIGHTS, exported_config, load_exported, read_metadata
    from cellcls.run.checkpoint import restore

    if backend not in BACKENDS:
        raise CellclsError(f"backend={backend} is not one of {', '.join(BACKENDS)}.")
    where = resolve_device(device)
    folder = Path(path).expanduser() if isinstance(path, str | Path) else None
    if folder is not None and folder.is_dir():
        config, metadata = exported_config(folder), read_metadata(folder)
        if backend == "onnx":
            if not (folder / ONNX).is_file():
                raise CellclsError(
                    f"'{folder}' holds no {ONNX}: export it with "
                    f"python -m cellcls.export ckpt_path=… export.format=onnx"
                )
            run, model = onnx_runner(folder / ONNX, where), None
        else:
            if not (folder / WEIGHTS).is_file():
                raise CellclsError(f"'{folder}' holds no {WEIGHTS}; backend=onnx runs its {ONNX}.")
            model = load_exported(folder)
            run = torch_runner(model, where, precision)
    else:
        if backend == "onnx":
            raise CellclsError(
                f"backend=onnx runs an export folder, not a checkpoint ('{path}'): "
                "python -m cellcls.export ckpt_path=… export.format=onnx"
            )
        restored = restore(path, data=False, ensemble=True)
        config, metadata, model = restored.config, {}, restored.model
        run = torch_runner(model, where, precision)
    data = config.data
    trust = metadata.get("trust") if model is None else getattr(model, "trust", None)
    if conformal is not None:
        trust = read_trust(conformal)
        if trust["classes"] != list(data.classes):
            raise CellclsError(
                f"conformal={conformal} is of classes {trust['classes']}, the model of "
                f"{list(data.classes)}."
            )
    return Classifier(
        run,
        list(data.classes),
        int(data.image_size),
        data.get("crop"),
        backend,
        str(where),
        model,
        metadata,
        trust,
    )


def read_trust(file: str | Path) -> dict[str, Any]:
    """A conformal.json of `cellcls.cv` (held-out evidence, `cellcls.reports.trust`)."""
    path = Path(file).expanduser()
    try:
        trust = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CellclsError(f"conformal={path}: not a readable conformal.json ({err}).") from None
    needed = ("classes", "cell_scores", "cell_labels", "confidence", "correct")
    if not isinstance(trust, dict) or any(k not in trust for k in needed):
        raise CellclsError(f"conformal={path} is not a conformal.json written by cellcls.cv.")
    return trust
