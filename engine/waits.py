"""Lets the executor that runs a call know when the call waits on I/O.

The gRPC servers keep few threads computing at once (control/warm_pool.py: more would
spend their time passing the GIL around). A call that blocks on an fsync, a commit, or a
round trip to etcd or to a node agent says so here, and its thread stops counting while
it waits (after a short grace), so that another call computes meanwhile instead of the
CPU idling. engine/ knows nothing of the executor: a worker thread registers itself as
the Waiter of its thread; on any other thread io_wait() does nothing.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

_local = threading.local()


class Waiter(Protocol):
    def wait_begins(self) -> Any: ...  # a token for wait_ends
    def wait_ends(self, token: Any) -> None: ...


def set_waiter(waiter: Waiter | None) -> None:
    """Called by an executor's worker thread for itself."""
    _local.waiter = waiter


class io_wait:  # noqa: N801 - used like a function: `with io_wait():`
    """Wrap a wait on I/O (an fsync, a commit, a group commit's turn, a remote call).
    A plain class, not a generator: it runs several times per call."""

    __slots__ = ("_waiter", "_token")

    def __enter__(self) -> None:
        self._waiter = getattr(_local, "waiter", None)
        if self._waiter is not None:
            self._token = self._waiter.wait_begins()

    def __exit__(self, *exc: object) -> None:
        if self._waiter is not None:
            self._waiter.wait_ends(self._token)
