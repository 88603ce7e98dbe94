"""User-facing errors: reported as one clear message, never as a traceback."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


class CellclsError(Exception):
    """A mistake the user can fix (bad path, bad layout, bad setting); the message says how."""


def exit_on_user_error(fn: F) -> F:
    """Turn a `CellclsError` raised by an entry point into a clean exit with its message."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            # Hydra's instantiate wraps what a constructor raises: look for ours in the chain.
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, CellclsError):
                cause = cause.__cause__
            if cause is None:
                raise
            log.error("%s", cause)
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                # Hydra then marks this job failed and runs the others (see cellcls.summary).
                raise cause from None
            # SystemExit is not an Exception, so Hydra does not wrap it in a traceback.
            raise SystemExit(f"error: {cause}") from None

    return wrapper  # type: ignore[return-value]


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
