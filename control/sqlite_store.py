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
    Check,
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
    validate_ops,
)
from engine.group_commit import GroupCommit

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
        self._lock = threading.Lock()  # watches, history and the list of readers
        self._group_changes: list[_Change] = []  # the open group's writes
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
        self._group = GroupCommit(self._conn, lambda: Unavailable("the cluster store is closed"),
                                  on_begin=self._read_revision,
                                  before_commit=self._save_revision,
                                  after_commit=self._group_done, max_group=MAX_GROUP)

    @property
    def commits(self) -> int:
        """Commits applied; `groups`: the COMMITs (fsyncs) that made them durable."""
        return self._group.bodies

    @property
    def groups(self) -> int:
        return self._group.groups

    # -- reads -----------------------------------------------------------------------------
    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._group.closed:
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
        conflict: Conflict | None = None
        with self._group.body():
            if not self._apply(ops, encoded):
                self._group.undo_body()  # and still waits for its group
                conflict = Conflict(self._failed_guards(ops))
            revision = self._revision
        if conflict is not None:
            raise conflict
        return revision

    def _apply(self, ops: Sequence[Op], encoded: Sequence[str]) -> bool:
        """Write every op under its guard; False as soon as a guard fails (the caller rolls
        the body back). Called inside the commit's savepoint.

        A write's guard is part of its statement (UPDATE ... WHERE version=?, an INSERT
        that does nothing when the key exists): no separate read per guarded key. Checks
        go first, so every guard sees the state before this commit (a commit writes each
        key once, so no write changes another write's guard)."""
        for op in ops:
            if isinstance(op, Check) and self._version(op.key) != op.expect:
                return False
        revision = self._revision + 1
        changes = []
        execute = self._conn.execute
        for op, data in zip(ops, encoded, strict=True):
            if isinstance(op, Put):
                if op.expect is None:
                    execute("INSERT INTO records(key, version, data) VALUES (?,?,?) ON "
                            "CONFLICT(key) DO UPDATE SET version=excluded.version, "
                            "data=excluded.data", (op.key, revision, data))
                elif op.expect == 0:
                    if not execute("INSERT INTO records(key, version, data) VALUES (?,?,?) "
                                   "ON CONFLICT(key) DO NOTHING",
                                   (op.key, revision, data)).rowcount:
                        return False
                elif not execute("UPDATE records SET version=?, data=? WHERE key=? AND "
                                 "version=?", (revision, data, op.key, op.expect)).rowcount:
                    return False
                changes.append(_Change(op.key, data, revision))
            elif isinstance(op, Delete):
                if op.expect is None:
                    deleted = execute("DELETE FROM records WHERE key=?", (op.key,)).rowcount
                else:
                    deleted = execute("DELETE FROM records WHERE key=? AND version=?",
                                      (op.key, op.expect)).rowcount
                    if not deleted:
                        return False
                if deleted:
                    changes.append(_Change(op.key, None, revision))
        if changes:
            self._revision = revision  # saved in the file once per group, before its COMMIT
            self._group_changes.extend(changes)
        return True

    def _failed_guards(self, ops: Sequence[Op]) -> Sequence[str]:
        return [op.key for op in ops
                if op.expect is not None and self._version(op.key) != op.expect]

    def _version(self, key: str) -> int:
        row = self._conn.execute("SELECT version FROM records WHERE key=?", (key,)).fetchone()
        return row[0] if row else 0

    # -- the group commit's steps (engine/group_commit.py), the writer held ---------------
    def _read_revision(self) -> None:
        # the file's counter, not ours alone: another store object or process may have
        # committed since (BEGIN IMMEDIATE excludes it from now on)
        (self._revision,) = self._conn.execute(
            "SELECT value FROM meta WHERE name='revision'").fetchone()

    def _save_revision(self) -> None:
        self._conn.execute("UPDATE meta SET value=? WHERE name='revision' AND value<>?",
                           (self._revision, self._revision))

    def _group_done(self, durable: bool) -> None:
        changes, self._group_changes = self._group_changes, []
        if durable:
            with self._lock:
                self._publish(changes)

    # -- watches -------------------------------------------------------------------------------
    def watch(self, prefix: str = "", start_revision: int = 0) -> Watch:
        """Events of keys starting with prefix, from start_revision (0: from now on)."""
        with self._lock:
            if self._group.closed:
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
        if not changes:
            return
        for change in changes:
            if len(self._history) == self._history.maxlen:
                self._history_floor = self._history[0].revision
            self._history.append(change)
            for prefix, start, w in self._watches:
                if change.revision >= start and change.key.startswith(prefix):
                    w.push(change.event())
        self._published = changes[-1].revision

    # -- life cycle ----------------------------------------------------------------------------
    def close(self) -> None:
        if self._group.closed:
            return

        def fail_watches_and_disconnect() -> None:
            with self._lock:
                for _, _, w in self._watches:
                    w.fail(Unavailable("the cluster store was closed"))
                self._watches.clear()
                for conn in self._readers:
                    conn.close()
                self._readers.clear()
            self._conn.close()

        self._group.close(fail_watches_and_disconnect)

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["SqliteStore", "prefix_end"]
