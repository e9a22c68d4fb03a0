"""Undo what a failed call did, step by step, newest first.

A node call registers an undo step right after each side effect (an attached device, a
mount, a directory, a record). If the call fails, every step registered so far runs, in
reverse order, and the original error goes on; if it succeeds, nothing is undone. An
undo step that fails is logged and the others still run: a half rollback beats none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)


class Rollback:
    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def add(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run fn(*args, **kwargs) to undo `what` if the call fails."""
        self._steps.append((what, fn, args, kwargs))

    def __enter__(self) -> Rollback:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            return
        for what, fn, args, kwargs in reversed(self._steps):
            try:
                fn(*args, **kwargs)
            except Exception:  # noqa: BLE001 - the original error is the one to report
                log.exception("rolling back %s failed", what)
