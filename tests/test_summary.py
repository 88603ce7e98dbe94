"""Sweep summaries: from job folders, and after a real multirun (one folder per job, one
generated dataset) in which some jobs fail."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from cellcls.summary import main, record_job, write_summary
from tests.conftest import FAST, last_value, run_module

TINY = ["data.n_train=8", "data.n_test=2", "data.image_size=32", "trainer.max_epochs=1"]


def fake_job(sweep: Path, name: str, lr: str, acc: float | None, status: str) -> None:
    """A job folder as a train job leaves it (metrics only when it got that far)."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- model.optimizer.lr={lr}\n- seed=1\n")
    (job / ".hydra" / "config.yaml").write_text("optimized_metric: val/acc_best\n")
    if acc is not None:
        (job / "csv").mkdir()
        (job / "csv" / "metrics.csv").write_text(
            f"epoch,val/acc_best,test/acc\n0,{acc / 2},\n0,{acc},\n0,,{acc - 0.1}\n"
        )
    record_job(job, status, 12.5, "" if status == "completed" else "ValueError: boom")


def read_rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "summary.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_summary_is_sorted_best_first_with_failures_last(tmp_path: Path) -> None:
    fake_job(tmp_path, "0", "1e-3", 0.5, "completed")
    fake_job(tmp_path, "1", "-1", None, "failed")
    fake_job(tmp_path, "2", "1e-4", 0.75, "completed")
    write_summary(tmp_path)
    rows = read_rows(tmp_path)
    assert [r["job"] for r in rows] == ["2", "0", "1"]
    assert rows[0]["model.optimizer.lr"] == "1e-4" and rows[0]["seed"] == "1"
    assert float(rows[0]["val/acc_best"]) == 0.75 and float(rows[0]["test/acc"]) == 0.65
    assert rows[0]["seconds"] == "12.5"
    assert rows[2]["status"] == "failed" and rows[2]["val/acc_best"] == ""
    assert rows[2]["error"] == "ValueError: boom"
    md = (tmp_path / "summary.md").read_text()
    assert "3 jobs, 1 not completed" in md and "Every job: `seed=1`" in md
    assert "| 2 | completed | 1e-4 | 0.7500 |" in md
    with Image.open(tmp_path / "summary.png") as im:
        assert im.size[0] > 300


def test_a_sweep_of_cross_validations_ranks_by_oof_accuracy_with_its_interval(
    tmp_path: Path,
) -> None:
    for name, augment, acc in (("0", "light", 0.81), ("1", "strong", 0.86)):
        job = tmp_path / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- augment={augment}\n")
        (job / ".hydra" / "config.yaml").write_text("optimized_metric: oof_accuracy\n")
        cv = {"oof_accuracy": acc, "oof_accuracy_ci95": [acc - 0.05, acc + 0.04]}
        (job / "cv_metrics.json").write_text(json.dumps(cv))
    write_summary(tmp_path)
    rows = read_rows(tmp_path)
    assert [r["augment"] for r in rows] == ["strong", "light"]
    assert float(rows[0]["oof_accuracy"]) == 0.86 and rows[0]["ci95"] == "[0.810, 0.900]"
    assert rows[0]["status"] == "completed"  # cv_metrics.json: the job finished


def test_rebuild_from_the_command_line(tmp_path: Path, capsys) -> None:
    fake_job(tmp_path, "0", "1e-3", 0.5, "completed")
    fake_job(tmp_path, "1", "1e-4", 0.75, "completed")
    main([str(tmp_path), "--mode", "min"])
    assert [r["job"] for r in read_rows(tmp_path)] == ["0", "1"]
    assert "summary.md" in capsys.readouterr().out


@pytest.mark.slow
def test_multirun_summary_with_failing_jobs(tmp_path: Path, synthetic_cache: Path) -> None:
    # One good job; lr=-1 fails inside Lightning (torch), val_fraction=1.5 fails cellcls's checks.
    sweep_args = ["data.val_fraction=0.5,1.5", "model.optimizer.lr=1e-3,-1"]
    result = run_module(
        "cellcls.train", ["-m", *FAST, *TINY, *sweep_args], tmp_path, synthetic_cache
    )
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    rows = read_rows(sweep)
    assert len(rows) == 4, result.stderr[-3000:]
    best, *failed = rows
    assert best["status"] == "completed", result.stderr[-3000:]
    assert (best["data.val_fraction"], best["model.optimizer.lr"]) == ("0.5", "0.001")
    assert float(best["seconds"]) > 0 and best["test/acc"] and best["val/acc_best"]
    assert [r["status"] for r in failed] == ["failed"] * 3
    errors = {(r["data.val_fraction"], r["model.optimizer.lr"]): r["error"] for r in failed}
    assert "model.optimizer.lr=-1 is not accepted" in errors[("0.5", "-1")]
    assert "data.val_fraction" in errors[("1.5", "0.001")]
    # Every job ran although some failed; Hydra then reports the failure in the exit status.
    assert result.returncode != 0
    assert json.loads((sweep / "0" / "job.json").read_text())["status"] in ("completed", "failed")
    assert (sweep / "summary.md").is_file() and (sweep / "summary.png").is_file()
    # One folder per job; the good one has its checkpoint, its TEST figure and its own lr.
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1", "2", "3"]
    assert (sweep / "0" / "checkpoints" / "last.ckpt").is_file()
    last_value(sweep / "0" / "csv" / "metrics.csv", "test/acc")
    assert last_value(sweep / "0" / "csv" / "metrics.csv", "lr-Adam") == 1e-3
    # Every job used the one dataset generated for these settings.
    dataset = synthetic_cache / "synthetic-8-2-x5-seed0"
    assert len(list((dataset / "TRAIN" / "MONOCYTE").iterdir())) == 8
