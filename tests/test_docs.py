"""Every cellcls command in the docs composes: what a reader copies still parses and names real
configs, groups and keys. Composition only (Hydra's Compose API, in this process): nothing trains,
and commands on the real data (`data.root=/path/...`) need no data."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, compose_run
from tests.test_repo import MARKDOWN, ROOT

BASH = re.compile(r"^ *```(?:bash|sh|shell|console)[^\n]*\n(.*?)^ *```", re.M | re.S)
ENTRY = re.compile(r"^(?:python3? -m cellcls\.(\w+)|cellcls-(\w+))(?: |$)")
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


def single_run(overrides: list[str]) -> list[str]:
    """A multirun's overrides as one job: each sweep (`k=a,b`, `k=range(...)`) at its first value;
    lists (`k=[a,b]`) and quoted values stay as they are."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [
        f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
        if o.is_sweep_override()
        else o.input_line
        for o in parsed
    ]


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
    name = match.group(1) or match.group(2)
    args = words[3:] if match.group(1) else words[1:]
    assert importlib.util.find_spec(f"cellcls.{name}"), f"{where}: no module cellcls.{name}"
    if name in NOT_HYDRA:
        return
    assert (CONF_DIR / f"{name}.yaml").exists(), f"{where}: cellcls.{name} has no conf/{name}.yaml"
    overrides = single_run([a for a in args if a not in ("-m", "--multirun")])
    cfg = compose_run(overrides, tmp_path, config_name=name)
    missing = [k for k in cfg if k != "hydra" and OmegaConf.is_missing(cfg, k)]
    assert not missing, f"{where}: `{command}` leaves required settings unset: {missing}"
