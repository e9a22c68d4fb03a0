"""The embedded cluster store: one SQLite file (WAL, synchronous=FULL), for all-in-one mode.

Implements control.store.Store. Versions come from a store-wide revision counter kept in
the file (like etcd's), bumped once per commit that writes: every key written by a
commit gets its revision as version, and versions never repeat, even after delete and
re-create or a reopen.

Writes are group-committed as in engine/state.py: concurrent commits run one after
another as savepoints inside one SQLite transaction, and a single COMMIT (one fsync)
makes the whole group durable; no caller returns before its group is on disk. A commit
whose guard fails rolls back only its own savepoint (and still waits for its group, so
a retry reads what it conflicted with). Reads use one connection per thread and see the
last durable state; they never wait behind a commit's fsync.

Watches are in-process: the committer hands each durable group's events to the watchers,
and a bounded in-memory history lets a watch start at a recent past revision. Older
revisions (and anything before the store was opened) raise Compacted, as a compacted
etcd does.
"""

from __future__ import annotations

import collections
import os
import sqlite3
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

from control.store import (
    MAX_OPS,
    Compacted,
    Conflict,
    Delete,
    Event,
    Listing,
    Op,
    Put,
    Records,
    Unavailable,
    Versioned,
    Watch,
    decode,
    encode,
    is_write,
    validate_ops,
)

MAX_GROUP = 32  # commits made durable together at most
HISTORY_EVENTS = 4096  # events kept for watches that start in the past


class _Change(NamedTuple):
    """A durable write as kept for watches; decoded only when a watch receives it, so
    commits pay nothing for watches and every watch gets its own copy of the value."""

    key: str
    data: str | None  # None: deleted
    revision: int

    def event(self) -> Event:
        value = None if self.data is None else Versioned(decode(self.data), self.revision)
        return Event(self.key, value, self.revision)


_WatchEntry = list[tuple[str, int, Watch]]  # [] until registered, then [(prefix, start, watch)]


def prefix_end(prefix: str) -> str | None:
    """The least string greater than every string that starts with prefix (None: no bound)."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:  # surrogates cannot be encoded in UTF-8
                nxt = 0xE000
            return "".join(chars) + chr(nxt)
    return None


class SqliteStore:
    """control.store.Store on one SQLite file, created with mode 0600."""

    max_ops = MAX_OPS

    def __init__(self, path: str):
        self._path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # SQLite gives -wal/-shm the same mode
        os.close(fd)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._open = False  # an outer SQLite transaction is open
        self._batch = 0  # the group being filled (or last filled)
        self._committed = 0  # the last group finished (made durable or failed)
        self._committing = False
        self._pending = 0  # callers between arrival and the end of their savepoint
        self._failed: dict[int, BaseException] = {}
        self._bodies = 0  # commits in the group being filled
        self._group_changes: list[_Change] = []
        self.commits = 0  # commits applied, and the groups (fsyncs) that made them durable
        self.groups = 0
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(
            "CREATE TABLE IF NOT EXISTS records ("
            " key TEXT PRIMARY KEY, version INTEGER NOT NULL, data TEXT NOT NULL) WITHOUT ROWID;"
            "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
            "INSERT OR IGNORE INTO meta VALUES ('revision', 0);"
        )
        (self._revision,) = self._conn.execute(
            "SELECT value FROM meta WHERE name='revision'").fetchone()
        self._published = self._revision  # last revision handed to watchers
        self._history: collections.deque[_Change] = collections.deque(maxlen=HISTORY_EVENTS)
        self._history_floor = self._revision  # every event after this one is in _history
        self._watches: list[tuple[str, int, Watch]] = []  # (prefix, start revision, watch)
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._closed = False

    # -- reads -----------------------------------------------------------------------------
    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise Unavailable("the cluster store is closed")
            conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._lock:
                self._readers.append(conn)
        return conn

    def get(self, key: str) -> Versioned | None:
        row = self._reader().execute(
            "SELECT version, data FROM records WHERE key=?", (key,)).fetchone()
        return Versioned(decode(row[1]), row[0]) if row else None

    def list(self, prefix: str = "", *, after: str = "",
             limit: int = 0) -> Records:
        return self._select(self._reader(), prefix, after, limit)

    def list_with_revision(self, prefix: str = "", *, after: str = "",
                           limit: int = 0) -> Listing:
        conn = self._reader()
        conn.execute("BEGIN")  # one read transaction: the items and the revision agree
        try:
            (revision,) = conn.execute("SELECT value FROM meta WHERE name='revision'").fetchone()
            items = self._select(conn, prefix, after, limit)
        finally:
            conn.execute("COMMIT")
        return Listing(items, revision)

    @staticmethod
    def _select(conn: sqlite3.Connection, prefix: str, after: str,
                limit: int) -> Records:
        sql = "SELECT key, version, data FROM records WHERE key >= ? AND key > ?"
        args: list[Any] = [prefix, after]
        end = prefix_end(prefix)
        if end is not None:
            sql += " AND key < ?"
            args.append(end)
        sql += " ORDER BY key"  # BINARY collation on UTF-8: byte order, as etcd
        if limit > 0:
            sql += " LIMIT ?"
            args.append(limit)
        rows = conn.execute(sql, args).fetchall()
        return [(key, Versioned(decode(data), version)) for key, version, data in rows]

    # -- writes ------------------------------------------------------------------------------
    def commit(self, ops: Sequence[Op]) -> int:
        ops = validate_ops(ops, self.max_ops)
        for op in ops:
            if isinstance(op, Put) and op.lease:
                raise ValueError("the SQLite store has no leases (they need etcd)")
        encoded = [encode(op.value) if isinstance(op, Put) else "" for op in ops]
        with self._cond:
            if self._closed:
                raise Unavailable("the cluster store is closed")
            self._pending += 1
            while self._committing:  # no statement may run while COMMIT does
                self._cond.wait()
            if self._closed:
                self._pending -= 1
                raise Unavailable("the cluster store is closed")
            if not self._open:
                self._conn.execute("BEGIN IMMEDIATE")
                # the file's counter, not ours alone: another store object or process may
                # have committed since (BEGIN IMMEDIATE excludes it from now on)
                (self._revision,) = self._conn.execute(
                    "SELECT value FROM meta WHERE name='revision'").fetchone()
                self._open = True
                self._batch += 1
                self._bodies = 0
            batch = self._batch
            self._conn.execute("SAVEPOINT op")
            try:
                conflict = self._apply(ops, encoded)
            except BaseException:
                self._conn.execute("ROLLBACK TO op")
                self._conn.execute("RELEASE op")
                self._pending -= 1
                self._cond.notify_all()
                raise
            if conflict is not None:
                self._conn.execute("ROLLBACK TO op")
            self._conn.execute("RELEASE op")
            revision = self._revision
            self._pending -= 1
            self._bodies += 1
            self.commits += 1
            self._wait_durable(batch)
        if conflict is not None:
            raise conflict
        return revision

    def _apply(self, ops: Sequence[Op], encoded: Sequence[str]) -> Conflict | None:
        """Check every guard, then write; called inside the commit's savepoint."""
        failed = [op.key for op in ops if op.expect is not None
                  and self._version(op.key) != op.expect]
        if failed:
            return Conflict(failed)
        if not any(is_write(op) for op in ops):
            return None
        revision = self._revision + 1
        changes = []
        for op, data in zip(ops, encoded, strict=True):
            if isinstance(op, Put):
                self._conn.execute(
                    "INSERT INTO records(key, version, data) VALUES (?,?,?) ON CONFLICT(key)"
                    " DO UPDATE SET version=excluded.version, data=excluded.data",
                    (op.key, revision, data))
                changes.append(_Change(op.key, data, revision))
            elif isinstance(op, Delete) and self._conn.execute(
                    "DELETE FROM records WHERE key=?", (op.key,)).rowcount:
                changes.append(_Change(op.key, None, revision))
        self._revision = revision  # saved in the file once per group, before its COMMIT
        self._group_changes.extend(changes)
        return None

    def _version(self, key: str) -> int:
        row = self._conn.execute("SELECT version FROM records WHERE key=?", (key,)).fetchone()
        return row[0] if row else 0

    def _wait_durable(self, batch: int) -> None:
        """Return once `batch` is committed; commit it ourselves when nobody else will add
        to it. Called with the lock held."""
        while self._committed < batch:
            # commit when no one else is about to add to the group, or when it is big
            # enough that waiting longer would only add latency
            full = self._bodies >= MAX_GROUP
            if not self._committing and self._open and (self._pending == 0 or full):
                self._commit_group(batch)
            else:
                self._cond.wait()
        if batch in self._failed:
            raise self._failed[batch]

    def _commit_group(self, batch: int) -> None:
        self._committing = True
        changes, self._group_changes = self._group_changes, []
        revision = self._revision
        self._lock.release()  # others may queue up meanwhile: they form the next group
        error: BaseException | None = None
        try:
            self._conn.execute("UPDATE meta SET value=? WHERE name='revision' AND value<>?",
                               (revision, revision))
            self._conn.execute("COMMIT")
        except BaseException as e:  # noqa: BLE001 - handed to every caller of the group
            error = e
        finally:
            self._lock.acquire()
        if error is not None:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._failed[batch] = error
        else:
            self.groups += 1
            self._publish(changes)
        self._open = False
        self._committing = False
        self._committed = batch
        self._cond.notify_all()

    # -- watches -------------------------------------------------------------------------------
    def watch(self, prefix: str = "", start_revision: int = 0) -> Watch:
        """Events of keys starting with prefix, from start_revision (0: from now on)."""
        with self._lock:
            if self._closed:
                raise Unavailable("the cluster store is closed")
            start = start_revision if start_revision > 0 else self._published + 1
            entry: _WatchEntry = []
            w = Watch(on_cancel=lambda: self._unwatch(entry))
            if start <= self._history_floor:
                w.fail(Compacted(self._history_floor + 1))
                return w
            for change in self._history:
                if change.revision >= start and change.key.startswith(prefix):
                    w.push(change.event())
            entry.append((prefix, start, w))
            self._watches.append(entry[0])
            return w

    def _unwatch(self, entry: _WatchEntry) -> None:
        with self._lock:
            if entry and entry[0] in self._watches:
                self._watches.remove(entry[0])

    def _publish(self, changes: Sequence[_Change]) -> None:
        """Hand a durable group's changes to the watchers; called with the lock held."""
        for change in changes:
            if len(self._history) == self._history.maxlen:
                self._history_floor = self._history[0].revision
            self._history.append(change)
            for prefix, start, w in self._watches:
                if change.revision >= start and change.key.startswith(prefix):
                    w.push(change.event())
        self._published = self._revision  # (no commit can run while a group commits)

    # -- life cycle ----------------------------------------------------------------------------
    def close(self) -> None:
        with self._cond:
            while self._committing:  # a group's COMMIT runs without the lock held
                self._cond.wait()
            if self._closed:
                return
            self._closed = True  # callers waiting to start a commit give up
            if self._open:  # the group being filled: commit it, its callers are waiting
                self._commit_group(self._batch)
            for _, _, w in self._watches:
                w.fail(Unavailable("the cluster store was closed"))
            self._watches.clear()
            for conn in self._readers:
                conn.close()
            self._readers.clear()
            self._conn.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["SqliteStore", "prefix_end"]
