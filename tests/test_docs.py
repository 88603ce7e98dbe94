"""Every cellcls command in the docs composes: what a reader copies still parses and names real
configs, groups and keys. Composition only (Hydra's Compose API, in this process): nothing trains,
and commands on the real data (`data.root=/path/...`) need no data."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from cellcls.run.cli import single_run
from tests.conftest import CONF_DIR, compose_run
from tests.test_repo import MARKDOWN, ROOT

BASH = re.compile(r"^ *```(?:bash|sh|shell|console)[^\n]*\n(.*?)^ *```", re.M | re.S)
# The module after cellcls. (bench.inference) or the script's name (bench-inference).
ENTRY = re.compile(r"^(?:python3? -m cellcls\.([\w.]+)|cellcls-([\w-]+))(?: |$)")
NOT_HYDRA = {"summary"}  # python -m cellcls.summary SWEEP_FOLDER [--mode min]: argparse
# What the reader fills in (`<run>`, `<date>_<time>`): composed as a plain name.
PLACEHOLDER = re.compile(r"<[\w-]+>")


def shell_lines(text: str) -> list[str]:
    """The commands of a bash block: continued lines joined, comments and blank lines dropped."""
    lines, quote = [], None
    for line in text.replace("\\\n", " ").splitlines():
        kept = []
        for i, ch in enumerate(line):
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "#" and (i == 0 or line[i - 1].isspace()):
                break
            kept.append(ch)
        lines.append("".join(kept).strip())
    return [ln for ln in lines if ln]


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every cellcls entry point run in a bash block of the docs."""
    found = []
    for path in MARKDOWN:
        for block in BASH.findall(path.read_text()):
            for line in shell_lines(block):
                words = shlex.split(line)
                while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
                    words.pop(0)  # VAR=value before the command
                if ENTRY.match(" ".join(words)):
                    found.append((str(path.relative_to(ROOT)), line))
    return found


COMMANDS = documented_commands()


def test_the_docs_have_commands() -> None:
    names = {ENTRY.match(cmd).group(1) or ENTRY.match(cmd).group(2) for _, cmd in COMMANDS}
    assert {"train", "eval", "predict", "export", "groups"} <= names, names


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w}: {c}" for w, c in COMMANDS])
def test_documented_command_composes(where: str, command: str, tmp_path: Path) -> None:
    words = shlex.split(PLACEHOLDER.sub("X", command))
    while not ENTRY.match(" ".join(words)):
        words.pop(0)
    match = ENTRY.match(" ".join(words))
    module = (match.group(1) or match.group(2)).replace("-", ".")
    args = words[3:] if match.group(1) else words[1:]
    assert importlib.util.find_spec(f"cellcls.{module}"), f"{where}: no module cellcls.{module}"
    if module in NOT_HYDRA:
        return
    name = module.replace(".", "_")  # its config: conf/bench_inference.yaml
    assert (CONF_DIR / f"{name}.yaml").exists(), f"{where}: cellcls.{name} has no conf/{name}.yaml"
    overrides = single_run([a for a in args if a not in ("-m", "--multirun")])
    cfg = compose_run(overrides, tmp_path, config_name=name)
    missing = [k for k in cfg if k != "hydra" and OmegaConf.is_missing(cfg, k)]
    assert not missing, f"{where}: `{command}` leaves required settings unset: {missing}"


def test_configuration_md_tree_names_every_config() -> None:
    """docs/configuration.md's conf/ tree lists every top-level config and group."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    tree = text.split("## The conf/ tree", 1)[1].split("```")[1]
    for path in sorted(CONF_DIR.iterdir()):
        name = path.name + ("/" if path.is_dir() else "")
        assert f"── {name}" in tree, f"docs/configuration.md's tree lacks {name}"


def test_evaluation_md_names_every_report_file(tmp_path: Path) -> None:
    """docs/evaluation.md lists every file a test report writes (cellcls.reports.write_report)."""
    import numpy as np

    from cellcls.reports.metrics import write_report

    paths = [str(tmp_path / f"{i}.png") for i in range(8)]
    for path in paths:
        Image.new("RGB", (8, 8)).save(path)
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    probs = np.eye(2)[[0, 1, 1, 1, 0, 0, 0, 1]].astype(float)
    write_report(
        tmp_path / "report", paths, labels, probs, ["A", "B"], groups=[0, 0, 1, 1, 2, 2, 3, 3]
    )
    text = (ROOT / "docs" / "evaluation.md").read_text()
    written = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert "per_group.csv" in written and "reliability.png" in written
    for name in written:
        assert f"`{name}`" in text, f"docs/evaluation.md does not name {name}"
