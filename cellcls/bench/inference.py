"""`python -m cellcls.bench.inference ckpt_path=PATH inputs=DIR`: prediction speed of every
backend on the same images, side by side in one run.

The checkpoint is exported once (model.safetensors and model.onnx) into the run folder, so every
backend runs the same weights. For each backend two figures: the model alone on images already
decoded and cropped, and end to end (`Classifier.predict` on the files: read, decode, white-cell
crop, resize, model), which is what `cellcls.predict` does on a folder. Each is the fastest of
two passes after a warm-up pass; the table is for people, the last line one JSON object.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from cellcls.bench.loops import PASSES
from cellcls.core.errors import is_whole, require, require_given
from cellcls.core.hardware import auto_precision, cpu_has_native_bf16
from cellcls.data.decode import Cell, cpu_count
from cellcls.data.layout import find_images
from cellcls.export import export
from cellcls.inference import Classifier, load_classifier
from cellcls.run.cli import entry

log = logging.getLogger(__name__)


def best_speed(n: int, work: Callable[[], object]) -> float:
    """Images per second of the fastest of `PASSES - 1` passes of `work` after a warm-up."""
    times = []
    for _ in range(PASSES):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return n / min(times[1:])


def backends(device: str) -> list[tuple[str, str, str]]:
    """(row name, backend, precision) of every way this machine can run the model."""
    rows = [("torch fp32", "torch", "32-true")]
    if auto_precision(device) != "32-true":
        rows.append((f"torch {auto_precision(device)}", "torch", auto_precision(device)))
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.warning('onnxruntime is not installed (pip install -e ".[onnx]"): no onnx row')
    else:
        rows.append(("onnxruntime fp32", "onnx", "32-true"))
    return rows


def bench(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Every figure on the same first `bench.n_images` images of `inputs`."""
    files = find_images(cfg.inputs)[: cfg.bench.n_images]
    n, batch_size = len(files), cfg.batch_size
    folder = export(cfg.ckpt_path, out / "export", "onnx" if "onnx" in cfg.bench.backends else "")
    first = load_classifier(folder, cfg.device, "32-true")
    log.info("decode + crop of %d images on %d threads ...", n, cpu_count())
    cells = first.cells(files)  # also warms the file cache for every later row
    bad = [c for c in cells if not isinstance(c, Cell)]
    if bad:
        log.warning("%d of %d images could not be read: %s", len(bad), n, bad[0])
    images = np.stack([c.image for c in cells if isinstance(c, Cell)])
    r: dict[str, Any] = {"decode_crop_img_s": best_speed(n, lambda: first.cells(files))}
    rows = [(name, b, p) for name, b, p in backends(first.device) if b in cfg.bench.backends]
    for name, backend, precision in rows:
        clf = load_classifier(folder, cfg.device, precision, backend)
        log.info("%s: model alone, then end to end ...", name)
        r[f"{name} model_img_s"] = best_speed(len(images), lambda c=clf: model_pass(c, images))
        r[f"{name} end_to_end_img_s"] = best_speed(n, lambda c=clf: c.predict(files, batch_size))
    fastest = max((name for name, _, _ in rows), key=lambda k: r[f"{k} end_to_end_img_s"])
    return r | {
        "rows": [name for name, _, _ in rows],
        "fastest": fastest,
        "device": first.device,
        "cpu_bf16": cpu_has_native_bf16(),
        "threads": {"decode": cpu_count(), "torch": torch.get_num_threads(), "onnx": cpu_count()},
        "batch_size": batch_size,
        "image_size": first.image_size,
        "crop": first.crop,
        "n_images": n,
    }


def model_pass(clf: Classifier, images: np.ndarray) -> None:
    for start in range(0, len(images), 64):
        clf.probabilities(images[start : start + 64])


def format_results(r: dict[str, Any]) -> str:
    lines = [f"{'backend':<22} {'model img/s':>12} {'end to end img/s':>17}"]
    lines += [
        f"{name:<22} {r[f'{name} model_img_s']:>12.1f} {r[f'{name} end_to_end_img_s']:>17.1f}"
        for name in r["rows"]
    ]
    lines += [
        f"decode + crop alone: {r['decode_crop_img_s']:.1f} img/s on {r['threads']['decode']} "
        f"threads; fastest end to end: {r['fastest']}",
        f"{r['device']}, {r['n_images']} images, batch {r['batch_size']}, "
        f"{r['image_size']}px, crop {r['crop']}",
    ]
    return "\n".join(lines)


def check(cfg: DictConfig) -> None:
    require_given(
        cfg, ["ckpt_path", "inputs"], "python -m cellcls.bench.inference ckpt_path=… inputs=…"
    )
    require(
        is_whole(cfg.bench.n_images, 1), "bench.n_images", cfg.bench.n_images, "an integer >= 1"
    )
    require(is_whole(cfg.batch_size, 1), "batch_size", cfg.batch_size, "an integer >= 1")
    known = ("torch", "onnx")
    given = list(cfg.bench.backends)
    require(
        bool(given) and set(given) <= set(known), "bench.backends", given, "a list of torch, onnx"
    )


@entry("bench_inference", check)
def main(cfg: DictConfig) -> dict[str, Any]:
    results = bench(cfg, Path(cfg.paths.output_dir))
    print(format_results(results))
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in results.items()}))
    return results


if __name__ == "__main__":
    main()
