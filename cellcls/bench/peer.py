"""The tutorial's Keras training, as a peer of cellcls's in `cellcls.bench`: `keras_peer.py` beside
this file is a standalone script (numpy and TensorFlow only, no cellcls or torch), so it runs
under another Python (`bench.peer_python`) and never shares threads with PyTorch; this module
starts it and reads its figures."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

KERAS_PEER = Path(__file__).with_name("keras_peer.py")
PEERS_INSTALL = 'pip install -e ".[peers]"'


def keras_train(
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: DictConfig,
    python: str | None = None,
    epochs: int = 3,
) -> tuple[float | None, str]:
    """The tutorial's Keras training of its CNN on the same uint8 NCHW `images`: images per
    second (best of the `epochs` after the first, like `timed_pass`) and a description, or None
    and why not.

    It runs in a subprocess (`python`, default this one), so TensorFlow and PyTorch never share a
    process or threads; it gets as many threads as PyTorch has.
    """
    net = cfg.model.net
    tutorial = (net._target_, net.get("channels"), net.get("hidden"))
    if tutorial != ("cellcls.models.SmallCNN", 32, 128):
        return None, "skipped: the Keras peer is the tutorial's network (model=smallcnn)"
    python = python or sys.executable
    with tempfile.TemporaryDirectory(prefix="cellcls-bench-") as tmp:
        np.save(f"{tmp}/x.npy", images.permute(0, 2, 3, 1).contiguous().numpy())
        np.save(f"{tmp}/y.npy", labels.numpy())
        args = {
            "images": f"{tmp}/x.npy",
            "labels": f"{tmp}/y.npy",
            "batch-size": cfg.data.batch_size,
            "epochs": epochs,
            "threads": torch.get_num_threads(),
            "classes": len(cfg.data.classes),
            "lr": cfg.model.optimizer.get("lr", 1e-3),
            "seed": cfg.seed,
        }
        command = [python, str(KERAS_PEER), *(f"--{k}={v}" for k, v in args.items())]
        result = subprocess.run(command, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        return None, f"failed (exit status {result.returncode} of {python}):\n{tail}"
    out = json.loads(lines[-1])
    if "skipped" in out:
        return None, f"skipped: {out['skipped']}; add it with {PEERS_INSTALL}"
    xla = ", XLA" if out.get("jit_compile") else ""
    what = f"TensorFlow {out['tensorflow']}, Keras {out['keras']}{xla}, {out['threads']} threads"
    return max(out["img_s"][1:]), what
