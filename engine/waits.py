"""Lets the executor that runs a call know when the call waits on I/O.

The gRPC servers keep few threads computing at once (control/warm_pool.py: more would
spend their time passing the GIL around). A call that blocks on an fsync, a commit, or a
round trip to etcd or to a node agent says so here, and its thread stops counting while
it waits (after a short grace), so that another call computes meanwhile instead of the
CPU idling. engine/ knows nothing of the executor: a worker thread
registers a context-manager factory for itself; on any other thread io_wait() does
nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

_local = threading.local()


def set_waiter(factory: Callable[[], contextlib.AbstractContextManager[None]] | None) -> None:
    """Called by an executor's worker thread for itself."""
    _local.factory = factory


@contextlib.contextmanager
def io_wait() -> Iterator[None]:
    """Wrap a wait on I/O (an fsync, a commit, a group commit's turn, a remote call)."""
    factory = getattr(_local, "factory", None)
    if factory is None:
        yield
        return
    with factory():
        yield
