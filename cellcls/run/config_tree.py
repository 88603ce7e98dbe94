"""The composed config as a tree, printed at the start of a run and saved in its folder."""

from __future__ import annotations

import io
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

FILE = "config_tree.log"


def config_tree(cfg: DictConfig) -> Tree:
    """One branch per top-level key, in the config's order (Hydra's own settings left out)."""
    tree = Tree("CONFIG", style="dim", guide_style="dim")
    written = OmegaConf.to_container(cfg, resolve=False)
    for key, raw in written.items():
        if key == "hydra":
            continue
        try:  # resolved, as the run sees it
            value = cfg[key]
            text = OmegaConf.to_yaml(value, resolve=True) if OmegaConf.is_config(value) else value
        except Exception:  # as written, e.g. a required `???` that the run will ask for
            text = OmegaConf.to_yaml(raw) if isinstance(raw, dict | list) else raw
        tree.add(str(key), style="bold", guide_style="dim").add(Syntax(str(text).strip(), "yaml"))
    return tree


@rank_zero_only
def print_config_tree(cfg: DictConfig, out_dir: str | Path | None = None) -> None:
    """Print the config tree (once, under DDP) and write it to `out_dir/config_tree.log`."""
    tree = config_tree(cfg)
    Console().print(tree)
    if out_dir is not None:
        text = Console(file=io.StringIO(), width=120, color_system=None)
        text.print(tree)
        lines = (line.rstrip() for line in text.file.getvalue().splitlines())
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / FILE).write_text("\n".join(lines) + "\n")
