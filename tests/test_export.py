"""`python -m cellcls.export`: safetensors weights plus the config that rebuilds the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cellcls.export import load_exported, main
from cellcls.run.checkpoint import load_checkpoint
from tests.conftest import CLASSES, best_checkpoint, compose_run, run_module


@pytest.mark.slow
def test_export_and_reload(trained_run, tmp_path: Path, synthetic_cache: Path) -> None:
    run, _ = trained_run
    ckpt_path = best_checkpoint(run)
    out = tmp_path / "export"
    args = [f"ckpt_path={ckpt_path}", f"hydra.run.dir={out}"]
    result = run_module("cellcls.export", args, tmp_path, synthetic_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"model.safetensors", "config.yaml"} <= {p.name for p in out.iterdir()}

    state = load_checkpoint(ckpt_path)["state_dict"]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(state)
    model = load_exported(out).eval()
    assert model.classes == CLASSES
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    with torch.inference_mode():
        assert model(x).shape == (2, len(CLASSES))


def test_export_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="ckpt_path is required: python -m cellcls.export"):
        main.__wrapped__(compose_run([], tmp_path, "export"))
