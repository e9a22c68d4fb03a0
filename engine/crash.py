"""Named crash points, so tests can kill the driver at an exact step of an operation.

Set TANDEM_CRASH_AT=<name>[,<name>...] and the process SIGKILLs itself when it reaches
that point: no cleanup handlers run, exactly as with `kill -9`. Set TANDEM_FAIL_AT instead
and the same point raises InjectedFault, so tests can check that a failed step rolls back
what the call did. TANDEM_PAUSE_AT=<name>:<seconds> makes the point sleep, so tests can
line up another call against an operation held at that step. Unset, each costs a dict
lookup.
"""

from __future__ import annotations

import os
import signal
import time

_ENV = "TANDEM_CRASH_AT"
_FAIL_ENV = "TANDEM_FAIL_AT"
_PAUSE_ENV = "TANDEM_PAUSE_AT"


class InjectedFault(Exception):
    """Raised at an armed TANDEM_FAIL_AT point: an unexpected failure (INTERNAL)."""


def _armed(env: str) -> frozenset[str]:
    return frozenset(p for p in os.environ.get(env, "").split(",") if p)


def point(name: str) -> None:
    """Die here, as if by `kill -9`, when the point `name` is armed; fail here when the
    point is armed for failure."""
    environ = os.environ
    if _ENV not in environ and _FAIL_ENV not in environ and _PAUSE_ENV not in environ:
        return  # the common case: three dict lookups
    for armed in _armed(_PAUSE_ENV):
        where, _, seconds = armed.partition(":")
        if where == name:
            time.sleep(float(seconds or 1))
    if name in _armed(_ENV):
        os.kill(os.getpid(), signal.SIGKILL)
    if name in _armed(_FAIL_ENV):
        raise InjectedFault(f"injected failure at {name}")
