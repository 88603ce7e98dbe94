"""`run.json`: what a figure needs beside it, written into the run folder of every entry point
(`cellcls.run.cli.entry`), once it has finished.

The command that reproduces the run, the machine it ran on, the date, the git commit, the wall
time and the run's own figures (`result`). A figure quoted in the docs is read from one such
record, kept under docs/records/ with the run's report files, and tests/test_records.py checks
the docs against them: a figure and its time can no longer come from two runs.
"""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.rank_zero import rank_zero_only

from cellcls.core.hardware import cpu_has_native_bf16
from cellcls.data.decode import cpu_count

FILE = "run.json"
REPO = Path(__file__).resolve().parents[2]


def command(module: str) -> str:
    """The command line of this run: `python -m <module>` and its overrides."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    return shlex.join(["python", "-m", module, *overrides])


def machine() -> dict[str, Any]:
    """The CPU (as Linux names it), its cores and bf16 maths, and the GPU, if one is used."""
    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        fields = dict(
            line.split(":", 1) for line in info.split("\n\n")[0].splitlines() if ":" in line
        )
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = f"{fields.get('model name', cpu)} (family {fields.get('cpu family')}, model "
        cpu += f"{fields.get('model')})"
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": cpu_count(),
        "cpu_bf16": cpu_has_native_bf16(),
        "gpu": gpu,
        "torch": torch.__version__,
    }


def git_commit() -> str | None:
    """The checkout's commit, `+dirty` when tracked files differ from it; None outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        status = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


# The report files whose figures a record carries (train/eval, cv, compare).
REPORTS = ("metrics.json", "cv_metrics.json", "compare.json", "ood_metrics.json")


@rank_zero_only
def write_record(out_dir: str | Path, module: str, started: float, returned: Any = None) -> Path:
    """Write `out_dir/run.json`: `started` is the `time.perf_counter()` the run began at, and
    the result is what the entry point returned with the report files it wrote (`REPORTS`)."""
    out_dir = Path(out_dir)
    result: dict[str, Any] = {"returned": returned}
    for name in REPORTS:
        if (out_dir / name).is_file():
            result[name] = json.loads((out_dir / name).read_text())
    record = {
        "command": command(module),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine(),
        "wall_s": round(time.perf_counter() - started, 1),
        "result": result,
    }
    file = out_dir / FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return file
