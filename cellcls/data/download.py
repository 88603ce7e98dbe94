"""Kaggle's "Blood Cell Images", fetched with kagglehub when the user asks: data.download=true."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from cellcls.core.errors import CellclsError
from cellcls.data.layout import KAGGLE_URL, find_split_root

log = logging.getLogger(__name__)
HANDLE = "paultimothymooney/blood-cells"
# Where kagglehub looks for credentials (kagglehub.config), in the words of a user. Not
# `kagglehub.login()`: it keeps them in the Python process that calls it, and training runs in
# its own (a notebook's `!python` child process never sees them).
AUTHENTICATE = (
    "set KAGGLE_USERNAME and KAGGLE_KEY in the environment of the training process (on Colab: "
    "from notebook secrets into os.environ, as notebooks/colab.ipynb does), or put kaggle.json "
    "(kaggle.com: Settings > API > Create New Token) in ~/.kaggle/"
)


def ensure_dataset(root: str | Path, splits: Sequence[str]) -> None:
    """Download the dataset into `root` unless `root` already holds `splits` (see layout)."""
    try:
        find_split_root(root, splits)
    except CellclsError:
        download(Path(root).expanduser())


def download(root: Path) -> Path:
    """Download the dataset with kagglehub into `root` (new or empty); return where it is.

    Inside Colab kagglehub serves the dataset from Colab's own cache (under /kaggle/input/) and
    ignores `output_dir`: `root` is then made a link to the folder it returns, so this run and
    later ones find the dataset at `root` all the same.
    """
    if root.is_dir() and any(root.iterdir()):
        raise CellclsError(
            f"data.download=true, but data.root '{root}' holds other files and not the dataset: "
            "point data.root at a new or empty folder to download into, or at the dataset."
        )
    import kagglehub  # only when asked: it starts an HTTP client

    log.info(
        "Downloading Kaggle's %s into %s with kagglehub (if Kaggle asks for credentials: %s).",
        HANDLE,
        root.resolve(),
        AUTHENTICATE,
    )
    try:
        path = Path(kagglehub.dataset_download(HANDLE, output_dir=str(root)))
    except Exception as err:  # kagglehub and requests raise many types
        raise CellclsError(why_not(err)) from None
    if path.resolve() != root.resolve() and root.resolve() not in path.resolve().parents:
        if root.is_dir():
            root.rmdir()  # new or empty, as checked above
        root.parent.mkdir(parents=True, exist_ok=True)
        root.symlink_to(path.resolve(), target_is_directory=True)
        log.info(
            "kagglehub put %s in %s (Colab's dataset cache ignores the folder asked for); "
            "data.root %s now links to it.",
            *(HANDLE, path.resolve(), root),
        )
    else:
        log.info("Downloaded %s to %s; later runs read it from there.", HANDLE, path.resolve())
    return path


def why_not(err: Exception) -> str:
    """One line on a failed download and what to do about it."""
    import requests
    from kagglehub.exceptions import CredentialError, UnauthenticatedError

    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, CredentialError | UnauthenticatedError) or status in (401, 403):
        code = f" (HTTP {status})" if status else ""
        return f"Kaggle asks for credentials to download {HANDLE}{code}: {AUTHENTICATE}."
    first_line = (str(err).strip().splitlines() or [""])[0][:160]
    if isinstance(err, requests.ConnectionError | requests.Timeout):
        host = re.search(r"host='([^']+)'", str(err))
        return (
            f"Could not reach {host[1] if host else 'Kaggle'} to download {HANDLE} (offline?, "
            f"{type(err).__name__}). Download it "
            f"on a machine with a network ({KAGGLE_URL}) and pass data.root=<its folder>, or run "
            "on generated images with data=synthetic."
        )
    return f"Downloading {HANDLE} from Kaggle failed: {type(err).__name__}: {first_line}"
