"""How every Hydra entry point starts: `@entry("train")` is `@hydra.main` with user errors
refused in one line, printed once, before the config tree and before any work.

Before Hydra runs the app, `preflight` composes the config the command line asks for and
refuses a group option that does not exist (private parts such as `model/_classifier` are never
offered), a key that is not a setting (with the closest one), and a value that cannot be
resolved (`data.root` missing, a folder with one class): Hydra would print its own many-line
message or two tracebacks for these. What only the run can check (the settings' values, the
data's layout) the entry point checks before it prints the tree (`exit_on_user_error` words it).
"""

from __future__ import annotations

import difflib
import functools
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from cellcls import CONFIG_DIR
from cellcls.core.errors import CellclsError, exit_on_user_error, user_error
from cellcls.run.config_tree import print_config_tree
from cellcls.run.record import write_record

# Settings that moved: the old name is refused with the new one.
RENAMED = {"cv.folds": "data.folds", "cv.fold": "data.fold", "search.cv_folds": "data.folds"}
# Hydra flags after which the command line is not a run of this app's config.
NOT_A_RUN = (
    "cfg",
    "help",
    "hydra_help",
    "version",
    "shell_completion",
    "info",
    "experimental_rerun",
)


def choices(group: str) -> list[str]:
    """The options of config group `group`: its yaml files, without the `_*.yaml` parts that
    other configs extend."""
    folder = Path(CONFIG_DIR) / group
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


def groups() -> list[str]:
    """Every config group of conf/ (nested ones as `a/b`), without Hydra's own."""
    root = Path(CONFIG_DIR)
    found = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir())
    return sorted(g for g in found if not g.startswith("hydra") and choices(g))


def groups_help() -> str:
    """`group: option, option, ...` lines for `--help` (the `${cellcls_groups:}` resolver in
    conf/hydra/default.yaml): Hydra's own listing offers the private parts too."""
    return "\n".join(f"{g}: {', '.join(choices(g))}" for g in groups())


def single_run(overrides: Sequence[str]) -> list[str]:
    """A multirun's overrides as one job: each sweep (`k=a,b`, `k=range(...)`) at its first value;
    lists (`k=[a,b]`) and quoted values stay as they are."""
    return [first_value(o) for o in OverridesParser.create().parse_overrides(list(overrides))]


def first_value(o: Override) -> str:
    if o.is_sweep_override():
        return f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
    return o.input_line


def close(word: str, candidates: Sequence[str], cutoff: float = 0.6) -> str:
    """' (did you mean X?)' for the closest of `candidates`, or ''."""
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=cutoff)
    return f" (did you mean {match[0]}?)" if match else ""


def option_values(o: Override) -> Iterator[Any]:
    """The options a group override asks for: each of a sweep, each of a list, or the one."""
    values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
    for value in values:
        yield from value if isinstance(value, list) else [value]


def check_group(o: Override) -> None:
    group = o.key_or_group
    accepted = choices(group)
    for value in option_values(o):
        if value is None or value in accepted:
            continue
        why = "a part other configs extend, not an option" if str(value).startswith("_") else ""
        raise CellclsError(
            f"{group}={value} is not accepted{': ' + why if why else ''}: {group} must be one of "
            f"{', '.join(accepted)}{close(str(value), accepted)}."
        )


def setting_names(cfg: DictConfig) -> set[str]:
    """Every dotted key of `cfg`, at every depth (not resolved, not Hydra's)."""

    def walk(node: Any, prefix: str) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield prefix + str(key)
                yield from walk(value, f"{prefix}{key}.")

    tree = OmegaConf.to_container(cfg, resolve=False)
    return {k for k in walk(tree, "") if not k.startswith("hydra")}


def check_key(key: str, known: set[str]) -> None:
    """Refuse a key that is not a setting, naming its first unknown part and the closest
    setting beside it."""
    parent, _, name = key.rpartition(".")
    if key in known or (name.isdigit() and parent in known):  # a list item: data.mean.0
        return
    if key in RENAMED:
        raise CellclsError(f"{key} is now {RENAMED[key]}: give {RENAMED[key]}=... instead.")
    if parent and parent not in known:
        check_key(parent, known)
    siblings = sorted(k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent)
    near = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    hint = f" (did you mean {parent + '.' if parent else ''}{near[0]}?)" if near else ""
    where = f"a setting of {parent}" if parent else "a setting"
    raise CellclsError(f"{key} is not {where}{hint}; `--cfg job` lists them all.")


def preflight(config_name: str, argv: Sequence[str]) -> None:
    """Compose `config_name` with the command line `argv` as Hydra will, and raise the one-line
    `CellclsError` for the first user error in it (see the module docstring)."""
    from hydra._internal.utils import get_args_parser  # Hydra's own reading of the command line

    try:
        args = get_args_parser().parse_args(list(argv))
    except SystemExit:  # argparse's own message is already one line: Hydra says it again
        return
    if any(getattr(args, flag, None) for flag in NOT_A_RUN) or args.config_name or args.config_dir:
        return
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException as err:
        raise CellclsError(str(err).splitlines()[0]) from None
    ours = [o for o in parsed if not o.key_or_group.startswith("hydra")]
    picked = [o for o in ours if (Path(CONFIG_DIR) / o.key_or_group).is_dir()]
    for o in picked:
        check_group(o)
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        try:
            known = setting_names(compose(config_name, [first_value(o) for o in picked]))
            for o in ours:
                if o not in picked and not o.is_delete() and not o.is_add():
                    check_key(o.key_or_group, known)
            cfg = compose(config_name, [first_value(o) for o in ours], return_hydra_config=True)
        except HydraException as err:
            raise CellclsError(str(err).splitlines()[0]) from None
    resolve(cfg)


def resolve(cfg: DictConfig) -> None:
    """Resolve every setting, as the run will: a resolver's `CellclsError` (`class_folders` on
    a missing `data.root`) and a broken interpolation are one line here."""
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path.cwd())
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    try:
        for key in cfg:
            try:
                value = cfg[key] if key != "hydra" else None  # a scalar resolves when read
                if OmegaConf.is_config(value):
                    OmegaConf.to_container(value, resolve=True)
            except MissingMandatoryValue:  # `???`: the entry point names what to give
                continue
            except OmegaConfBaseException as err:
                ours = user_error(err)
                if ours is not None:
                    raise ours from None
                raise CellclsError(f"{err.full_key}: {str(err).splitlines()[0]}") from None
    finally:
        HydraConfig.instance().cfg = None


def entry(
    config_name: str, check: Callable[[DictConfig], None] | None = None
) -> Callable[[Callable[[DictConfig], Any]], Callable[..., Any]]:
    """`@hydra.main(config_name=...)` and `exit_on_user_error`, with `preflight` first; in the
    job, `check(cfg)` and the data's layout (`check_layout`) before the config tree is printed,
    and the run's record (`cellcls.run.record`, run.json) once it has finished.
    `main.__wrapped__(cfg)` runs the app alone on a composed config (tests/conftest.compose_run).
    """

    def wrap(fn: Callable[[DictConfig], Any]) -> Callable[..., Any]:
        def job(cfg: DictConfig) -> Any:
            if check is not None:
                check(cfg)
            check_data(cfg)
            out = HydraConfig.get().runtime.output_dir
            print_config_tree(cfg, out)
            started = time.perf_counter()
            returned = fn(cfg)
            write_record(out, entry_module(fn), started, returned)
            return returned

        app = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(
            exit_on_user_error(functools.wraps(fn)(job))
        )

        @functools.wraps(fn)
        def main(cfg_passthrough: DictConfig | None = None) -> Any:
            if cfg_passthrough is None:
                try:
                    preflight(config_name, sys.argv[1:])
                except CellclsError as err:
                    raise SystemExit(f"error: {err}") from None
            return app(cfg_passthrough)

        main.__wrapped__ = exit_on_user_error(fn)  # type: ignore[attr-defined]
        return main

    return wrap


def entry_module(fn: Callable[..., Any]) -> str:
    """The module `python -m` ran (`cellcls.bench.inference`), not `__main__`."""
    if fn.__module__ != "__main__":
        return fn.__module__
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec.name if spec is not None else fn.__module__


def check_data(cfg: DictConfig) -> None:
    """A run's data, when it names one (not a checkpoint's): its folders exist and hold the
    classes, before any work."""
    if "data" not in cfg or cfg.get("ckpt_path") or "_target_" not in cfg.data:
        return
    datamodule = instantiate(cfg.data, _convert_="object")
    if hasattr(datamodule, "check_layout"):
        datamodule.check_layout()
