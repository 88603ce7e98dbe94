"""Every headline figure in README.md and docs/results.md is read from one run's record
(docs/records/<name>/run.json, written by `cellcls.run.record`): its accuracy, interval and time
match that record, so a figure and its time can no longer come from two runs."""

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "records"
LINK = re.compile(r"\((?:docs/)?records/([\w-]+)/run\.json\)")
FIGURE = re.compile(r"(?<![\w.])[+\-−]?\d\.\d{3}(?!\d)")  # 0.867, +0.008, −0.007
MINUTES = re.compile(r"(\d+(?:\.\d)?) min\b")


def numbers(node: Any) -> Iterator[float]:
    """Every number in a record, at any depth."""
    if isinstance(node, bool):
        return
    if isinstance(node, int | float):
        yield float(node)
    elif isinstance(node, dict):
        for value in node.values():
            yield from numbers(value)
    elif isinstance(node, list):
        for value in node:
            yield from numbers(value)


def record(name: str) -> dict[str, Any]:
    return json.loads((RECORDS / name / "run.json").read_text())


def units(text: str) -> Iterator[tuple[int, str]]:
    """(first line, text) of each table row and each paragraph (a figure and its record link
    may sit on different lines of one paragraph)."""
    block: list[str] = []
    start = 0
    for i, line in enumerate([*text.splitlines(), ""], 1):
        if line.startswith("|") or not line.strip():
            if block:
                yield start, " ".join(block)
            block = []
            if line.startswith("|"):
                yield i, line
        else:
            start = start if block else i
            block.append(line)


def headline_lines() -> Iterator[tuple[str, str]]:
    """(where, text): README.md's paragraphs and rows, and docs/results.md's headline section."""
    for i, unit in units((ROOT / "README.md").read_text()):
        yield f"README.md:{i}", unit
    results = (ROOT / "docs" / "results.md").read_text()
    headline = results.split("\n## ")[1]  # the first section: the runs with records
    assert headline.startswith("Headline runs"), headline[:80]
    for i, unit in units(headline):
        yield f"docs/results.md (headline):{i}", unit


LINES = [(where, line) for where, line in headline_lines() if FIGURE.search(line)]


def test_every_record_is_a_complete_run() -> None:
    names = sorted(p.name for p in RECORDS.iterdir() if p.is_dir())
    assert names, "no records"
    for name in names:
        r = record(name)
        assert r["command"].startswith("python -m cellcls."), name
        assert r["machine"]["cpu"] and r["machine"]["cores"] >= 1, name
        assert r["git_commit"] and not r["git_commit"].endswith("+dirty"), name
        assert r["date"][:4] == "2026" and r["wall_s"] >= 0, name


@pytest.mark.parametrize(("where", "line"), LINES, ids=[w for w, _ in LINES])
def test_a_headline_figure_matches_its_record(where: str, line: str) -> None:
    names = LINK.findall(line)
    assert names, f"{where}: a figure without its record (docs/records/<name>/run.json): {line}"
    recorded = [round(v, 3) for name in names for v in numbers(record(name)["result"])]
    for text in FIGURE.findall(line):
        value = abs(float(text.replace("−", "-")))
        near = any(abs(abs(v) - value) < 5e-4 for v in recorded)
        assert near, f"{where}: {text} is not in {names}: {line}"
    times = MINUTES.findall(line)
    if times:
        assert len(names) == 1, f"{where}: a time beside two records {names}: {line}"
        minutes = round(record(names[0])["wall_s"] / 60, 1)
        assert all(float(t) == minutes for t in times), f"{where}: {times} vs {minutes}: {line}"
