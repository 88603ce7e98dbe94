"""cellcls.app: the web page through its API (gradio_client) and in a real browser (headless
Debian chromium driven by Playwright), with bad uploads that must not stop it."""

from __future__ import annotations

import csv
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellcls.app import build_app, flag
from cellcls.inference import Prediction, load_classifier
from tests.conftest import CLASSES, best_checkpoint, write_png_bomb

pytest.importorskip("gradio")
CHROMIUM = Path("/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(trained_run, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """The page of the shared trained run, served on a free local port, and two test images."""
    run, _ = trained_run
    clf = load_classifier(best_checkpoint(run), device="cpu")
    app = build_app(clf, unsure_below=0.7, gradcam=True)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    folder = tmp_path_factory.mktemp("uploads")
    rows = list(csv.DictReader((run / "predictions.csv").open()))[:2]
    images = [Path(shutil.copy(r["path"], folder / f"cell{k}.png")) for k, r in enumerate(rows)]
    yield f"http://127.0.0.1:{port}/", clf, images
    app.close()


def test_flag_says_why_in_words() -> None:
    sure = Prediction("a.png", "MONOCYTE", {"MONOCYTE": 0.9, "NEUTROPHIL": 0.1})
    unsure = Prediction("a.png", "MONOCYTE", {"MONOCYTE": 0.5, "NEUTROPHIL": 0.5}, None, False)
    assert flag(sure, 0.7) == ""
    assert flag(unsure, 0.7) == (
        "unsure (top probability below 0.7); no white cell found: the centre was cropped"
    )
    assert flag(Prediction("b", None, error="not an image"), 0.7) == "not classified: not an image"
    # A calibrated classifier's own abstention decides, not the fixed threshold.
    calibrated = Prediction("a.png", "MONOCYTE", {"MONOCYTE": 0.9}, unsure=True)
    assert flag(calibrated, 0.7).startswith("unsure (below the confidence of the asked accuracy")
    assert flag(Prediction("a.png", "MONOCYTE", {"MONOCYTE": 0.5}, unsure=False), 0.7) == ""


@pytest.mark.slow
def test_page_api_classifies_and_survives_bad_uploads(served, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    url, clf, images = served
    (tmp_path / "notes.png").write_text("not an image at all")
    bomb = write_png_bomb(tmp_path / "bomb.png")
    client = Client(url, verbose=False)
    files = [handle_file(str(p)) for p in (images[0], tmp_path / "notes.png", bomb)]
    bars, table, gallery, status = client.predict(files, api_name="/classify")
    assert clf.trust  # the shared run's checkpoint is calibrated: sets and abstention show
    expected = clf.predict(images[0], coverage=0.95, abstain=0.95)
    assert bars["label"] == expected.label in CLASSES
    rows = {row[0]: row for row in table["data"]}
    assert rows["cell0.png"][1] == expected.label
    assert abs(rows["cell0.png"][2] - round(max(expected.probabilities.values()), 3)) < 1e-9
    assert rows["cell0.png"][3] == ", ".join(expected.set)
    assert rows["cell0.png"][4].startswith("unsure") == expected.unsure
    assert "not an image" in rows["notes.png"][4] and rows["notes.png"][1] == "-"
    assert "megapixels, over the limit" in rows["bomb.png"][4]
    flagged = int(bool(rows["cell0.png"][4]))
    assert status == f"1 classified, {flagged} flagged, 2 could not be read (see the table)"
    assert len(gallery) == 1  # the crop and its Grad-CAM map, of the one image read
    # Still serving after the bad files.
    again = client.predict([handle_file(str(images[1]))], api_name="/classify")
    assert again[0]["label"] == clf.predict(images[1]).label


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt install chromium)")
def test_page_in_a_real_browser(served, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, clf, images = served
    expected = clf.predict(images[0]).label
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        page = browser.new_page()
        page.goto(url)
        page.locator("#uploads input[type=file]").set_input_files([str(images[0])])
        page.get_by_role("button", name="Classify").click()
        table = page.locator("#table")
        expect(table).to_contain_text("cell0.png", timeout=60_000)
        expect(table).to_contain_text(expected)
        expect(page.locator("#bars")).to_contain_text(expected)
        expect(page.locator("#status")).to_contain_text("1 classified")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000
