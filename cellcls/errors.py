"""User-facing errors: reported as one clear message, never as a traceback."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

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
        except CellclsError as err:
            log.error("%s", err)
            # SystemExit is not an Exception, so Hydra does not wrap it in a traceback.
            raise SystemExit(f"error: {err}") from None

    return wrapper  # type: ignore[return-value]
