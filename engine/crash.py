"""Named crash points, so tests can kill the driver at an exact step of an operation.

Set TANDEM_CRASH_AT=<name>[,<name>...] and the process SIGKILLs itself when it reaches
that point: no cleanup handlers run, exactly as with `kill -9`. Unset, it costs a dict
lookup.
"""

from __future__ import annotations

import os
import signal

_ENV = "TANDEM_CRASH_AT"


def _armed() -> frozenset[str]:
    return frozenset(p for p in os.environ.get(_ENV, "").split(",") if p)


def point(name: str) -> None:
    """Die here, as if by `kill -9`, when the point `name` is armed."""
    if name in _armed():
        os.kill(os.getpid(), signal.SIGKILL)
