"""The repository itself: CI checks the style before the tests, and the tree passes it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_checks_style_before_the_tests() -> None:
    steps = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    tests = steps.index("python -m pytest -q")
    assert steps.index("python -m ruff check .") < tests
    assert steps.index("python -m ruff format --check .") < tests


@pytest.mark.slow
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


# The prose: a two-minute README, the rest in docs/, every relative link resolving.
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [README, ROOT / "CONTRIBUTING.md", *DOCS]
FENCE = re.compile(r"^ *(```+|~~~+).*?^ *\1 *$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(path: Path) -> str:
    """A Markdown file without its fenced code blocks and inline code, where links do not count."""
    return re.sub(r"(`+)[^\n]*?\1", "", FENCE.sub("", path.read_text()))


def relative_links(path: Path) -> list[str]:
    """The targets of the links and images in `path` that point into this repository."""
    return [t for t in LINK.findall(prose(path)) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def anchors(path: Path) -> set[str]:
    """The `#anchors` a code host makes of a Markdown file's headings (repeats get -1, -2, ...)."""
    slugs: set[str] = set()
    count: dict[str, int] = defaultdict(int)
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", FENCE.sub("", path.read_text()), re.M):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        slugs.add(f"{slug}-{count[slug]}" if count[slug] else slug)
        count[slug] += 1
    return slugs


def test_readme_reads_in_two_minutes() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= 200, f"README.md has {lines} lines: move detail into docs/"


def test_ci_installs_and_tests_as_the_readme_says() -> None:
    ci, readme = (ROOT / ".ci" / "run").read_text(), README.read_text()
    for step in ('pip install -e ".[dev]"', "python -m pytest -q"):
        assert step in ci and step in readme, step


def test_readme_maps_every_docs_page() -> None:
    """README's map of docs/: every page it links exists, and every page is on it."""
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(README)}
    linked_pages = {p for p in linked if p.parent == ROOT / "docs" and p.suffix == ".md"}
    assert DOCS, "docs/ has no pages"
    missing = sorted(p.name for p in linked_pages if not p.exists())
    assert not missing, f"README.md links docs pages that do not exist: {missing}"
    unlinked = sorted(p.name for p in DOCS if p.resolve() not in linked_pages)
    assert not unlinked, f"README.md's map of docs/ leaves out {unlinked}"


def test_every_relative_link_resolves() -> None:
    broken = []
    for path in MARKDOWN:
        for target in relative_links(path):
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# The layers of the package, each importing only from itself and the layers after it: entry
# points (cellcls/<name>.py, cellcls/bench/) -> run -> data, models, reports -> core.
LAYERS = {
    "core": {"core"},
    "data": {"core", "data"},
    "models": {"core", "models"},
    "reports": {"core", "reports"},
    "run": {"core", "data", "models", "reports", "run"},
}


def cellcls_imports(path: Path) -> set[str]:
    """The cellcls modules `path` imports, as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cellcls"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cellcls")}
    return found


def test_imports_flow_one_way() -> None:
    entry_points = {p.stem for p in (ROOT / "cellcls").glob("*.py")} - {"__init__"} | {"bench"}
    wrong = []
    for layer, allowed in LAYERS.items():
        for path in (ROOT / "cellcls" / layer).rglob("*.py"):
            for module in cellcls_imports(path):
                part = module.split(".")[1] if "." in module else ""
                if part in entry_points or (part and part not in allowed):
                    wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, wrong


def test_no_module_over_300_lines_without_a_reason() -> None:
    long = []
    for path in (ROOT / "cellcls").rglob("*.py"):
        lines = path.read_text().splitlines()
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if len(lines) > 300 and "Over 300 lines" not in doc:
            long.append(f"{path.relative_to(ROOT)}: {len(lines)} lines")
    assert not long, long
