"""`python -m cellcls.app ckpt_path=PATH [port=7860]`: a local web page to try a model on.

Drop one or more images: the page shows each image's crop (what the model saw) beside its
Grad-CAM heat map, the class probabilities of the first as bars, and a table of every image with
a flag where the model is unsure, where no white cell was found, or where the file could not be
read. For a checkpoint calibrated on held-out cells, unsure is the API's `abstain` (below the
confidence that gave that accuracy on those cells) and the table shows each image's conformal
`set` at `coverage`, and flags the images unlike the training images (the API's `ood`, at
`ood_rate` of held-out cells); for one without, unsure is a top probability below
`unsure_below`.
Uploads are files read by `cellcls.load_classifier`, so a file that is not an image, or a
decompression bomb, is refused by name (never decoded) and the page keeps serving. Gradio,
offline (no analytics, no share link), on 127.0.0.1 by default.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cellcls.core.errors import CellclsError, is_level, is_whole, require, require_given
from cellcls.inference import BACKENDS, Classifier, Prediction, load_classifier
from cellcls.run.cli import entry

log = logging.getLogger(__name__)

COLUMNS = ["file", "label", "probability", "set", "flag"]


def flag(result: Prediction, unsure_below: float) -> str:
    """Why a result needs a second look, in words ('' when it does not)."""
    if result.error is not None:
        return f"not classified: {result.error}"
    words = []
    if result.unsure:
        words.append("unsure (below the confidence of the asked accuracy on held-out cells)")
    elif result.unsure is None and max(result.probabilities.values()) < unsure_below:
        words.append(f"unsure (top probability below {unsure_below:g})")
    if result.ood:
        words.append("unlike the training images (out of distribution): check the image")
    if not result.cell_found:
        words.append("no white cell found: the centre was cropped")
    return "; ".join(words)


def overlays(clf: Classifier, results: list[Prediction], files: list[str], gradcam: bool):
    """(crop beside its heat map, caption) for every image that was classified."""
    good = [(f, r) for f, r in zip(files, results, strict=True) if r.error is None]
    if not good:
        return []
    crops = np.stack([c.image for c in clf.cells([f for f, _ in good])])
    panels = crops
    if gradcam and clf.model is not None:
        from pytorch_grad_cam.utils.image import show_cam_on_image

        from cellcls.reports.gradcam import heat_maps

        targets = [clf.classes.index(r.label) for _, r in good]
        maps, _ = heat_maps(clf.model, torch.from_numpy(crops).permute(0, 3, 1, 2), targets)
        panels = [
            np.concatenate([c, show_cam_on_image(np.float32(c) / 255, m, use_rgb=True)], 1)
            for c, m in zip(crops, maps, strict=True)
        ]
    return [
        (panel, f"{Path(f).name}: {r.label} {max(r.probabilities.values()):.2f}")
        for panel, (f, r) in zip(panels, good, strict=True)
    ]


def classify(
    clf: Classifier, files: list[str] | None, doubt: dict[str, Any], gradcam: bool
) -> tuple[dict[str, float], list[list[Any]], list, str]:
    """The page's outputs for the uploaded files: bars, table, gallery and a status line.
    `doubt`: `unsure_below`, and `coverage`, `abstain` and `ood` for a calibrated classifier
    (`ood` where its flag was fitted)."""
    if not files:
        return {}, [], [], "Drop one or more images, then press Classify."
    files = [str(f) for f in files]
    calibrated = {k: doubt[k] for k in ("coverage", "abstain")} if clf.trust else {}
    if clf.trust and "ood" in clf.trust:
        calibrated["ood"] = doubt["ood"]
    results = clf.predict(files, **calibrated)
    rows = [
        [
            Path(f).name,
            r.label or "-",
            round(max(r.probabilities.values()), 3) if r.probabilities else None,
            ", ".join(r.set) if r.set else "-",
            flag(r, doubt["unsure_below"]),
        ]
        for f, r in zip(files, results, strict=True)
    ]
    first = next((r for r in results if r.error is None), None)
    bad = sum(r.error is not None for r in results)
    unsure = sum(bool(row[4]) for row in rows) - bad
    status = f"{len(results) - bad} classified, {unsure} flagged"
    status += f", {bad} could not be read (see the table)" if bad else ""
    bars = first.probabilities if first is not None else {}
    return bars, rows, overlays(clf, results, files, gradcam), status


def build_app(
    clf: Classifier,
    unsure_below: float = 0.7,
    gradcam: bool = True,
    coverage: float = 0.95,
    abstain: float = 0.95,
    ood: float = 0.05,
):
    """The page as a `gradio.Blocks`; its API endpoint is `/classify` (gradio_client)."""
    doubt = {"unsure_below": unsure_below, "coverage": coverage, "abstain": abstain, "ood": ood}
    why = (
        f"flagged unsure below the confidence that gave accuracy {abstain:g} on held-out cells; "
        f"each set holds the true class with probability {coverage:g}"
        + (
            f"; flagged out of distribution above the score that flags {ood:g} of held-out cells"
            if "ood" in (clf.trust or {})
            else ""
        )
        if clf.trust
        else f"not calibrated: flagged when the top probability is below {unsure_below:g}"
    )
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    with gr.Blocks(title="cellcls", analytics_enabled=False) as app:
        gr.Markdown(
            f"## cellcls: white-cell classes\nClasses: {', '.join(clf.classes)}. "
            f"Input {clf.image_size} px, crop {'none' if clf.crop is None else clf.crop}. "
            f"A research model, not a diagnostic device; {why}."
        )
        files = gr.File(label="images", file_count="multiple", type="filepath", elem_id="uploads")
        button = gr.Button("Classify", variant="primary")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            bars = gr.Label(label="first image", num_top_classes=len(clf.classes), elem_id="bars")
            gallery = gr.Gallery(label="crop used | Grad-CAM", columns=2, height="auto")
        table = gr.Dataframe(
            headers=COLUMNS, label="every image", elem_id="table", interactive=False
        )
        button.click(
            lambda f: classify(clf, f, doubt, gradcam),
            inputs=files,
            outputs=[bars, table, gallery, status],
            api_name="classify",
        )
    return app


def check(cfg: DictConfig) -> None:
    require_given(cfg, ["ckpt_path"], "python -m cellcls.app ckpt_path=… [port=7860]")
    require(is_whole(cfg.port, 1) and cfg.port < 65536, "port", cfg.port, "a port, 1 to 65535")
    require(cfg.backend in BACKENDS, "backend", cfg.backend, " or ".join(BACKENDS))
    require(0 <= cfg.unsure_below <= 1, "unsure_below", cfg.unsure_below, "a probability")
    for name in ("coverage", "abstain", "ood"):
        ok = is_level(cfg[name])
        require(ok, name, cfg[name], "a level between 0 and 1 (exclusive), e.g. 0.95")
    require(isinstance(cfg.gradcam, bool), "gradcam", cfg.gradcam, "true or false")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CellclsError('cellcls.app needs gradio: pip install -e ".[app]"') from None


@entry("app", check)
def main(cfg: DictConfig) -> None:
    ckpt = cfg.ckpt_path
    ckpt = OmegaConf.to_container(ckpt) if OmegaConf.is_list(ckpt) else ckpt
    clf = load_classifier(ckpt, cfg.device, cfg.precision, cfg.backend, cfg.conformal)
    app = build_app(clf, cfg.unsure_below, cfg.gradcam, cfg.coverage, cfg.abstain, cfg.ood)
    log.info("Serving %s on http://%s:%d (Ctrl-C stops it)", clf, cfg.host, cfg.port)
    app.launch(server_name=cfg.host, server_port=cfg.port, share=False, show_error=True)


if __name__ == "__main__":
    main()
