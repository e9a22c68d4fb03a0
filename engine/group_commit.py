"""Group commit on one SQLite writer connection, shared by the node store (engine/state.py)
and the embedded cluster store (control/sqlite_store.py).

Concurrent transactions run one after another as savepoints ("bodies") inside one open
SQLite transaction, and a single COMMIT (one fsync with synchronous=FULL) makes the whole
group durable; no caller returns before its group is on disk. The caller that finishes a
body while nobody else is queued for the writer commits the group (a lone caller pays
exactly one commit); callers that queue up meanwhile join the group, up to max_group.

Wake-ups are targeted, which is most of the point on a busy driver: the writer is a plain
mutex (a release wakes one queued caller), and each group has its own event, set once
when it is durable (or failed), waking only its members. A shared condition with
notify_all woke every waiting thread at every commit, and each of them then fought for the
lock and the GIL.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator

from engine import waits

MAX_GROUP = 32  # bodies made durable together at most


class _Group:
    __slots__ = ("bodies", "done", "error")

    def __init__(self) -> None:
        self.bodies = 0
        self.done = threading.Event()
        self.error: BaseException | None = None


def _nothing() -> None:
    return None


@contextlib.contextmanager
def _held(lock: threading.Lock) -> Iterator[None]:
    """Release a lock taken already when the block ends."""
    try:
        yield
    finally:
        lock.release()


class GroupCommit:
    """Bodies in savepoints of a shared transaction on `conn`, committed in groups.

    on_begin runs right after BEGIN (e.g. reading a counter the file keeps),
    before_commit inside the transaction just before COMMIT, after_commit(ok) once the
    group is durable (ok) or rolled back; all three with the writer held."""

    def __init__(self, conn: sqlite3.Connection, closed_error: Callable[[], BaseException], *,
                 on_begin: Callable[[], None] = _nothing,
                 before_commit: Callable[[], None] = _nothing,
                 after_commit: Callable[[bool], None] = lambda ok: None,
                 max_group: int = MAX_GROUP):
        self._conn = conn
        self._closed_error = closed_error
        self._on_begin = on_begin
        self._before_commit = before_commit
        self._after_commit = after_commit
        self._max_group = max_group
        self._writer = threading.Lock()  # the writer connection, one caller at a time
        self._count_lock = threading.Lock()
        self._queued = 0  # callers between arrival and the end of their body
        self._group: _Group | None = None  # the group being filled: an open transaction
        self._savepoint = False  # the running body is in a savepoint (not its group's first)
        self.closed = False
        self.bodies = 0  # bodies run, and the groups (fsyncs) that made them durable
        self.groups = 0

    @contextlib.contextmanager
    def body(self) -> Iterator[None]:
        """Run the with-block as one all-or-nothing body; returns once its group is durable.

        An exception from the block rolls back the block alone and is raised at once. A
        block may roll back its own writes (undo_body) and still end normally: it
        then waits for its group like the others (so a retry reads what it saw)."""
        with self._count_lock:
            self._queued += 1
        group: _Group | None = None
        if not self._writer.acquire(blocking=False):
            with waits.io_wait():  # behind a commit's fsync, most likely
                self._writer.acquire()
        with _held(self._writer):
            try:
                if self.closed:
                    raise self._closed_error()
                if self._group is None:
                    self._begin()
                    self._savepoint = False  # the group's first body: nothing to keep apart
                else:
                    self._conn.execute("SAVEPOINT body")
                    self._savepoint = True
                try:
                    yield
                except BaseException:
                    self.undo_body()
                    if self._savepoint:
                        self._conn.execute("RELEASE body")
                    raise
                if self._savepoint:
                    self._conn.execute("RELEASE body")
                group = self._group
                assert group is not None
                group.bodies += 1
                self.bodies += 1
            finally:
                with self._count_lock:
                    self._queued -= 1
                    alone = self._queued == 0
                if self._group is not None and (alone or self._group.bodies >= self._max_group):
                    self._commit_group()
        if not group.done.is_set():
            with waits.io_wait():
                group.done.wait()
        if group.error is not None:
            raise group.error

    def _begin(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        self._group = _Group()
        self._on_begin()

    def undo_body(self) -> None:
        """Roll back the running body's writes (from inside it, the writer held). A body
        that undoes itself and ends normally still waits for its group."""
        if self._savepoint:
            self._conn.execute("ROLLBACK TO body")
            return
        # the group's first body had no savepoint (two statements fewer per commit): the
        # transaction held nothing else, so it goes whole and an empty one takes its place
        self._group = None
        self._conn.execute("ROLLBACK")
        self._after_commit(False)
        self._begin()

    def _commit_group(self) -> None:
        """COMMIT the open group (the writer held: queued callers form the next one)."""
        group, self._group = self._group, None
        assert group is not None
        if group.bodies == 0:  # every body of it failed: nothing to make durable
            self._conn.execute("ROLLBACK")
            self._after_commit(False)
            group.done.set()
            return
        try:
            self._before_commit()
            with waits.io_wait():  # the fsync
                self._conn.execute("COMMIT")
        except BaseException as e:  # noqa: BLE001 - handed to every member of the group
            group.error = e
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._after_commit(False)
        else:
            self.groups += 1
            self._after_commit(True)
        group.done.set()

    def close(self, then: Callable[[], None] = _nothing) -> None:
        """Commit the group being filled (its callers are waiting), refuse later bodies,
        then run `then` (closing connections) with the writer held."""
        with self._writer:
            if self._group is not None:
                self._commit_group()
            self.closed = True
            then()
