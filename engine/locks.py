"""Per-key operation locks: a second call on the same volume while one runs is ABORTED.

The CSI spec asks for ABORTED ("an operation for this volume is already pending")
rather than queueing, so the CO retries with backoff instead of piling up threads.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from engine.errors import Busy


class KeyLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held: set[str] = set()

    @contextlib.contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        wanted = sorted(set(k for k in keys if k))
        with self._guard:
            busy = [k for k in wanted if k in self._held]
            if busy:
                raise Busy(f"an operation on {busy[0]} is already in progress")
            self._held.update(wanted)
        try:
            yield
        finally:
            with self._guard:
                self._held.difference_update(wanted)
