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
        deadline = time.monotonic() + wait_s
        with self._guard:
            while True:
                busy = [k for k in wanted if k in self._held]
                if not busy:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OperationPending(f"an operation on {busy[0]} is already in progress")
                self._guard.wait(left)
            self._held.update(wanted)
        try:
            yield
        finally:
            with self._guard:
                self._held.difference_update(wanted)
                self._guard.notify_all()
