"""Per-key operation locks: a second call on the same volume while one runs is ABORTED.

The CSI spec asks for ABORTED ("an operation for this volume is already pending")
rather than queueing, so the CO retries with backoff instead of piling up threads.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from engine.errors import OperationPending


class KeyLocks:
    def __init__(self) -> None:
        self._guard = threading.Condition(threading.Lock())  # not re-entrant: cheaper
        self._held: set[str] = set()

    @contextlib.contextmanager
    def hold(self, *keys: str, wait_s: float = 0.0) -> Iterator[None]:
        """Holds every key, or raises OperationPending; wait_s > 0 first waits that long
        for busy keys to be released (for callers that know the holder finishes soon)."""
        wanted = sorted(set(k for k in keys if k))
        busy = self._acquire(wanted, wait_s)
        if busy:
            raise OperationPending(f"an operation on {busy} is already in progress")
        try:
            yield
        finally:
            self._release(wanted)

    @contextlib.contextmanager
    def hold_unless_busy(self, *keys: str, wait_s: float) -> Iterator[bool]:
        """Like hold, but yields False instead of raising when a key stays busy: for a
        repeated call whose work another holder is already finishing."""
        wanted = sorted(set(k for k in keys if k))
        held = not self._acquire(wanted, wait_s)
        try:
            yield held
        finally:
            if held:
                self._release(wanted)

    def _acquire(self, wanted: list[str], wait_s: float) -> str:
        """Takes every key in `wanted` and returns "", or returns a key still busy."""
        deadline = time.monotonic() + wait_s
        with self._guard:
            while True:
                busy = [k for k in wanted if k in self._held]
                if not busy:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return busy[0]
                self._guard.wait(left)
            self._held.update(wanted)
        return ""

    def _release(self, wanted: list[str]) -> None:
        with self._guard:
            self._held.difference_update(wanted)
            self._guard.notify_all()
