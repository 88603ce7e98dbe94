"""Sweep summaries: one row per job, best first, as summary.{csv,md,png} in the sweep folder.

`SweepSummary`, a Hydra callback (see conf/hydra/default.yaml), records each job's status and run
time in `<job>/job.json` and rebuilds the summary after every job. Hydra skips `on_multirun_end`
when a job has failed, and a sweep may be stopped early, so the summary is kept current as it goes.
`python -m cellcls.summary SWEEP_DIR` rebuilds it from the folder alone.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from cellcls.reports.metrics import interval

JOB_FILE = "job.json"
# Reported for every job besides its optimised metric: best validation and honest test accuracy.
REPORTED = ("val/acc_best", "test/acc")


def record_job(job_dir: str | Path, status: str, seconds: float, error: str = "") -> None:
    """Write `<job>/job.json`: what the summary cannot tell from the job's other files."""
    record = {"status": status, "seconds": round(seconds, 2), "error": error}
    Path(job_dir, JOB_FILE).write_text(json.dumps(record, indent=2) + "\n")


def last_logged(metrics_csv: Path, key: str) -> float | None:
    """The last value of `key` in a CSVLogger file, or None when it was never logged."""
    if not metrics_csv.is_file():
        return None
    with metrics_csv.open(newline="") as f:
        values = [row[key] for row in csv.DictReader(f) if row.get(key)]
    return float(values[-1]) if values else None


def job_row(job_dir: Path) -> dict[str, Any]:
    """One job's overrides, metrics, run time and status, from the files it left."""
    overrides = OmegaConf.to_container(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
    config = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    job_file = job_dir / JOB_FILE
    record = json.loads(job_file.read_text()) if job_file.is_file() else {}
    metrics = job_dir / "csv" / "metrics.csv"
    metric = OmegaConf.select(config, "optimized_metric") or REPORTED[0]
    # A cross-validation job (cellcls.cv) reports its pooled out-of-fold accuracy and interval.
    cv_file = job_dir / "cv_metrics.json"
    cv = json.loads(cv_file.read_text()) if cv_file.is_file() else {}
    # A job without job.json was killed, or is still running.
    done = (job_dir / "metrics.json").is_file() or bool(cv)
    return {
        "job": job_dir.name,
        "status": record.get("status", "completed" if done else "incomplete"),
        "params": dict(str(o).split("=", 1) for o in overrides if "=" in str(o)),
        "metric": metric,
        "value": cv.get(metric, last_logged(metrics, metric)),
        "ci95": cv.get(f"{metric}_ci95"),
        **{key: last_logged(metrics, key) for key in REPORTED},
        "seconds": record.get("seconds"),
        "error": record.get("error", ""),
    }


def collect(sweep_dir: str | Path, mode: str = "max") -> list[dict[str, Any]]:
    """Every job folder's row, best `mode` (max or min) value first; failed jobs and jobs without
    a value last."""
    jobs = [p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/overrides.yaml")]
    rows = [job_row(job) for job in jobs]
    sign = -1 if mode == "max" else 1

    def order(r: dict[str, Any]) -> tuple[bool, float, str]:
        last = r["value"] is None or r["status"] == "failed"
        return last, sign * (r["value"] or 0), r["job"].zfill(9)

    return sorted(rows, key=order)


def swept_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The override keys whose values differ between jobs, in first-seen order."""
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    return [k for k in keys if len({r["params"].get(k) for r in rows}) > 1]


def write_summary(sweep_dir: str | Path, mode: str = "max") -> Path | None:
    """Write summary.csv, summary.md and summary.png into `sweep_dir`; None if it has no jobs."""
    sweep = Path(sweep_dir)
    rows = collect(sweep, mode)
    if not rows:
        return None
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    metric = rows[0]["metric"]
    intervals = any(r["ci95"] for r in rows)
    header = ["job", "status", *keys, metric, *(["ci95"] if intervals else [])]
    header += [k for k in REPORTED if k != metric]
    header += ["seconds", "error"]
    table = [
        {
            "job": r["job"],
            "status": r["status"],
            **{k: r["params"].get(k, "") for k in keys},
            metric: r["value"],
            **({"ci95": interval(r["ci95"]) if r["ci95"] else ""} if intervals else {}),
            **{k: r[k] for k in REPORTED},
            "seconds": "" if r["seconds"] is None else f"{r['seconds']:.1f}",
            "error": r["error"],
        }
        for r in rows
    ]
    _atomic_write(sweep / "summary.csv", _csv_text(header, table))
    # The Markdown table shows only what differs between jobs; the rest is said once above it.
    swept = swept_keys(rows)
    same = [
        f"{k}={rows[0]['params'][k]}" for k in keys if k not in swept and k in rows[0]["params"]
    ]
    md_header = [h for h in header if h not in keys or h in swept]
    _atomic_write(sweep / "summary.md", _markdown(md_header, table, sweep, metric, mode, same))
    plot_sweep(rows, swept_keys(rows) or keys, metric, sweep / "summary.png")
    return sweep / "summary.csv"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _csv_text(header: Sequence[str], table: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([_cell(row[h]) for h in header] for row in table)
    return out.getvalue()


def _markdown(
    header: Sequence[str],
    table: Sequence[dict[str, Any]],
    sweep: Path,
    metric: str,
    mode: str,
    same: Sequence[str],
) -> str:
    failed = sum(row["status"] != "completed" for row in table)
    lines = [
        f"# Sweep {sweep.name}",
        "",
        f"{len(table)} jobs, {failed} not completed; sorted by `{metric}` ({mode} first).",
        "",
        *([f"Every job: `{' '.join(same)}`", ""] if same else []),
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for row in table:
        lines.append("| " + " | ".join(_short(_cell(row[h])) for h in header) + " |")
    return "\n".join(lines) + "\n"


def _short(text: str) -> str:
    """A long number (Optuna's values) to 4 significant digits; pipes escaped for Markdown."""
    number = _number(text)
    if number is not None and len(text) > 8:
        return f"{number:.4g}"
    return text.replace("|", "\\|")


def _atomic_write(path: Path, text: str) -> None:
    """Jobs on a cluster may rebuild the summary at once: readers only ever see a whole file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_sweep(
    rows: Sequence[dict[str, Any]], keys: Sequence[str], metric: str, path: Path
) -> None:
    """The metric against each swept value, one panel per swept key (completed jobs only)."""
    done = [r for r in rows if r["value"] is not None]
    keys = list(keys) or ["job"]
    cols = min(3, len(keys))
    n_rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.8 * n_rows), layout="constrained")
    for k, key in enumerate(keys):
        ax = fig.add_subplot(n_rows, cols, k + 1)
        raw = [r["job"] if key == "job" else r["params"].get(key, "") for r in done]
        numbers = [_number(v) for v in raw]
        ys = [r["value"] for r in done]
        if raw and all(n is not None for n in numbers):
            ax.scatter(numbers, ys)
            positive = min(numbers) > 0
            if positive and max(numbers) / min(numbers) >= 10:
                ax.set_xscale("log")
        else:
            labels = sorted(set(map(str, raw)))
            ax.scatter([labels.index(str(v)) for v in raw], ys)
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set(xlabel=key, ylabel=metric)
        ax.grid(alpha=0.3)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class SweepSummary(Callback):
    """Hydra callback: record each multirun job in `job.json` and keep the summary current."""

    def __init__(self, mode: str = "max") -> None:
        self.mode = mode
        self._start = time.perf_counter()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        error = ""
        if job_return.status == JobStatus.FAILED:
            err = job_return._return_value  # reading .return_value would raise it again
            error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        status = "completed" if job_return.status == JobStatus.COMPLETED else "failed"
        seconds = time.perf_counter() - self._start
        record_job(config.hydra.runtime.output_dir, status, seconds, error)
        write_summary(config.hydra.sweep.dir, self.mode)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_summary(config.hydra.sweep.dir, self.mode)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m cellcls.summary SWEEP_DIR [--mode min]`: rebuild a sweep's summary."""
    parser = argparse.ArgumentParser(prog="python -m cellcls.summary", description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a multirun or search folder")
    parser.add_argument("--mode", choices=("max", "min"), default="max", help="best is max/min")
    args = parser.parse_args(argv)
    written = write_summary(args.sweep_dir, args.mode)
    if written is None:
        parser.exit(1, f"error: no job folders (*/.hydra/overrides.yaml) in {args.sweep_dir}\n")
    print(f"Summary: {written.with_suffix('.md')}")


if __name__ == "__main__":
    main()
