"""Removal of tombstones off the request path, many per commit.

Once a node has confirmed that a deleted volume's storage is gone, its tombstone has done
its job; removing it is bookkeeping that DeleteVolume need not wait for. The sweeper
collects such tombstones and removes up to a commit's worth at a time, each guarded by
the version it was confirmed at (a tombstone that changed meanwhile is left for the
reconciler). A crash loses nothing: the tombstones stay, and the reconciler confirms and
removes them again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

from control.store import Conflict, Delete, Store
from engine.errors import EngineError
from engine.locks import KeyLocks

log = logging.getLogger(__name__)

TOMBSTONE_WAIT_S = 5.0  # a repeated Delete* call waits this long for a converging tombstone


@contextlib.contextmanager
def delete_lock(locks: KeyLocks, object_id: str, is_tombstone: Callable[[], bool],
                wait_s: float = TOMBSTONE_WAIT_S) -> Iterator[bool]:
    """The lock a DeleteVolume or DeleteSnapshot call works under (the caller reads its
    record inside); yields False when the call has nothing left to do.

    Free: held. Busy on a live record: ABORTED (OperationPending). Busy on a tombstone (a
    repeated call, while this call's first attempt or the reconciler converges it): waits
    for the holder a little; if it still runs, the deletion stands all the same (a
    tombstone always converges), so False and the call answers OK. Only this lock's
    refusal means OK: a node's Busy stays ABORTED. is_tombstone is asked only when busy.
    wait_s=0 for a call with nothing to do on a tombstone (ControllerUnpublish)."""
    with locks.hold_unless_busy(object_id, wait_s=0.0) as held:
        if held:
            yield True
            return
    if not is_tombstone():
        with locks.hold(object_id):  # OperationPending, unless released meanwhile
            yield True
        return
    with locks.hold_unless_busy(object_id, wait_s=wait_s) as held:
        if not held:
            log.info("%s: its tombstone is converging in another call", object_id)
        yield held


class TombstoneSweeper:
    def __init__(self, store: Store, on_removed: Callable[[str, int], None],
                 delay_s: float = 0.05):
        self.store = store
        self.on_removed = on_removed  # (key, revision): keep indexes current
        self.delay_s = delay_s
        self._pending: dict[str, int] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="tombstones", daemon=True)
        self._thread.start()

    def add(self, key: str, version: int) -> None:
        with self._cond:
            self._pending[key] = version
            self._cond.notify()

    def flush(self) -> None:
        """Remove everything collected so far, now (tests, shutdown)."""
        with self._cond:
            batch, self._pending = self._pending, {}
        self._remove(batch)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)
        self.flush()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            threading.Event().wait(self.delay_s)  # let a burst of deletes gather
            with self._cond:
                batch, self._pending = self._pending, {}
            try:
                self._remove(batch)
            except Exception:  # noqa: BLE001 - the reconciler removes them later
                log.exception("removing %d tombstones failed", len(batch))

    def _remove(self, batch: dict[str, int]) -> None:
        items = list(batch.items())
        step = self.store.max_ops
        for i in range(0, len(items), step):
            chunk = items[i:i + step]
            try:
                revision = self.store.commit([Delete(k, expect=v) for k, v in chunk])
            except Conflict:
                self._one_by_one(chunk)  # some changed meanwhile: leave those
                continue
            for key, _ in chunk:
                self.on_removed(key, revision)

    def _one_by_one(self, chunk: list[tuple[str, int]]) -> None:
        for key, version in chunk:
            try:
                revision = self.store.commit([Delete(key, expect=version)])
            except (Conflict, EngineError) as e:
                log.info("tombstone %s left for the reconciler: %s", key, e)
                continue
            self.on_removed(key, revision)
