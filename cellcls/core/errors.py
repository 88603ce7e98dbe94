"""User-facing errors: reported as one clear message, never as a traceback."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


class CellclsError(Exception):
    """A mistake the user can fix (bad path, bad layout, bad setting); the message says how."""


def exit_on_user_error(fn: F) -> F:
    """Turn a user error raised by an entry point (`user_error`) into a clean exit with its
    message, printed once (and written to the run's log file)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            cause = user_error(err)
            if cause is None:
                raise
            to_log_files(f"error: {cause}")
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                # Hydra then marks this job failed and runs the others (see cellcls.summary).
                log.error("%s", cause)
                raise cause from None
            # SystemExit is not an Exception, so Hydra does not wrap it in a traceback.
            raise SystemExit(f"error: {cause}") from None

    return wrapper  # type: ignore[return-value]


def user_error(err: BaseException) -> CellclsError | None:
    """The user's mistake behind `err`, or None for a bug. Hydra's instantiate and OmegaConf's
    resolvers wrap what a constructor or resolver raises, so the whole chain is searched; a
    keyword the constructor does not take (`unknown_key`) and Lightning's refusal of a trainer
    setting are user errors too."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, CellclsError):
            return cause
        known = unknown_key(cause) or misconfigured(cause)
        if known is not None:
            return known
        cause = cause.__cause__ or cause.__context__
    return None


def misconfigured(err: BaseException) -> CellclsError | None:
    """Lightning's MisconfigurationException (`trainer.accelerator=gpu` without one, ...)."""
    if type(err).__name__ != "MisconfigurationException":
        return None
    return CellclsError(f"the trainer settings do not work here: {str(err).splitlines()[0]}")


def to_log_files(message: str) -> None:
    """`message` into the log files only (Hydra's run log): the console gets it once, from the
    exit."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def unknown_key(err: BaseException) -> CellclsError | None:
    """The setting at fault when Hydra's `_target_` got a keyword it does not take.

    Swapping a config group keeps the keys an experiment set on it (`experiment=best
    model=resnet18` carries smallcnn_bn's `widths`), and the constructor's TypeError names only
    the key; Hydra's message names the config node."""
    if not (isinstance(err, InstantiationException) and isinstance(err.__cause__, TypeError)):
        return None
    key = re.search(r"unexpected keyword argument '(\w+)'", str(err.__cause__))
    node = re.search(r"full_key: (\S+)", str(err))
    target = re.search(r"target '([\w.]+)'", str(err))
    if not (key and node and target):
        return None
    name = f"{node[1]}.{key[1]}"
    return CellclsError(
        f"{name} is not a setting of {target[1]}: remove it (~{name}). A config group swapped "
        "under an experiment keeps the keys the experiment set on it."
    )


def require(ok: bool, name: str, value: Any, accepted: str) -> None:
    """Unless `ok`, raise the one-line error for setting `name`: its value and what it accepts."""
    if not ok:
        raise CellclsError(f"{name}={value!r} is not accepted: {name} must be {accepted}.")


def check_table(
    settings: Any, table: Sequence[tuple[str, Callable[[Any], bool], str]], prefix: str = ""
) -> None:
    """Check `settings` (attributes) against `table`'s rows `(name, rule, accepted)`, in order;
    the first rule that fails raises `require`'s one-line error for `prefix + name`."""
    for name, rule, accepted in table:
        require(rule(settings), prefix + name, getattr(settings, name), accepted)


def require_given(cfg: DictConfig, keys: Sequence[str], usage: str) -> None:
    """Refuse a run that lacks a required setting (`???` in its config), with `usage`."""
    for key in keys:
        if OmegaConf.is_missing(cfg, key):
            raise CellclsError(f"{key} is required: {usage}")


def is_whole(value: Any, minimum: int) -> bool:
    """Whether `value` is an int (not a bool, not a string) of at least `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_number(value: Any) -> bool:
    """Whether `value` is an int or a float (not a bool, not a string)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_level(value: Any) -> bool:
    """Whether `value` is a number strictly between 0 and 1 (a coverage or an accuracy asked)."""
    return is_number(value) and 0 < value < 1
