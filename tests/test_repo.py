"""The repository itself: CI checks the style before the tests, and the tree passes it."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_checks_style_before_the_tests() -> None:
    steps = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    tests = steps.index("python -m pytest -q")
    assert steps.index("python -m ruff check .") < tests
    assert steps.index("python -m ruff format --check .") < tests


def test_ruff_check_and_format() -> None:
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, f"ruff {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_no_helper_is_copied_between_test_files() -> None:
    """A helper that several test files need lives in conftest.py, once."""
    files_of = defaultdict(set)
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("test_"):
                files_of[ast.dump(node)].add(f"{path.name}:{node.name}")
    copies = [sorted(files) for files in files_of.values() if len(files) > 1]
    assert not copies, f"move these to tests/conftest.py: {copies}"
