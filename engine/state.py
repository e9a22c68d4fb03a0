"""The state store: a small, crash-safe record store behind one interface.

Records are JSON objects filed under (kind, key). Each carries a schema version so a
later release can migrate it. The embedded implementation is SQLite in WAL mode with
synchronous=FULL: a committed transaction survives a crash or power cut, and a torn
one is rolled back. A cluster store (etcd) implements the same interface.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any, Protocol

from engine import permissions
from engine.group_commit import GroupCommit

SCHEMA_VERSION = 1

Record = dict[str, Any]


class Txn(Protocol):
    def get(self, kind: str, key: str) -> Record | None: ...
    def put(self, kind: str, key: str, value: Record) -> None: ...
    def delete(self, kind: str, key: str) -> None: ...


class Store(Protocol):
    """What every state backend offers. Keys sort as byte strings within a kind."""

    def get(self, kind: str, key: str) -> Record | None: ...
    def list(
        self, kind: str, *, prefix: str = "", after: str = "", limit: int = 0
    ) -> list[tuple[str, Record]]: ...
    def put(self, kind: str, key: str, value: Record) -> None: ...
    def delete(self, kind: str, key: str) -> None: ...
    def txn(self) -> contextlib.AbstractContextManager[Txn]: ...
    def close(self) -> None: ...


class _SqliteTxn:
    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def get(self, kind: str, key: str) -> Record | None:
        row = self._conn.execute(
            "SELECT schema, data FROM records WHERE kind=? AND key=?", (kind, key)
        ).fetchone()
        return _decode(row) if row else None

    def put(self, kind: str, key: str, value: Record) -> None:
        self._conn.execute(
            "INSERT INTO records(kind, key, schema, data) VALUES (?,?,?,?) "
            "ON CONFLICT(kind, key) DO UPDATE SET schema=excluded.schema, data=excluded.data",
            (kind, key, SCHEMA_VERSION, json.dumps(value, sort_keys=True)),
        )

    def delete(self, kind: str, key: str) -> None:
        self._conn.execute("DELETE FROM records WHERE kind=? AND key=?", (kind, key))


def _decode(row: tuple[int, str]) -> Record:
    schema, data = row
    if schema > SCHEMA_VERSION:
        raise RuntimeError(f"state record has schema {schema}, newer than this driver")
    return json.loads(data)


class SqliteStore:
    """Embedded store: one SQLite file; one writer connection, and a reader connection per
    thread, so lookups never wait behind a commit's fsync (WAL readers see the last
    committed state).

    Writes are group-committed (engine/group_commit.py): transactions from concurrent
    threads run one after the other as savepoints inside one SQLite transaction, and a
    single COMMIT (one fsync) makes the whole group durable; no caller returns before its
    group is on disk.
    """

    def __init__(self, path: str):
        self._path = path
        self._lock = threading.Lock()  # the list of reader connections
        self._in_txn = threading.local()
        # Every tenant's records: owner-only. SQLite makes its -wal and -shm files with the
        # database's mode, so the database is made 0600 before SQLite opens it; files left
        # looser by an older release are tightened.
        permissions.private_file(path)
        for side_file in (path + "-wal", path + "-shm", path + "-journal"):
            permissions.tighten(side_file, permissions.PRIVATE_FILE)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS records ("
            " kind TEXT NOT NULL, key TEXT NOT NULL, schema INTEGER NOT NULL,"
            " data TEXT NOT NULL, PRIMARY KEY (kind, key))"
        )
        self._group = GroupCommit(self._conn, lambda: RuntimeError("the state store is closed"))
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []

    @property
    def groups(self) -> int:
        """COMMITs (fsyncs) so far: fewer than the transactions when they were grouped."""
        return self._group.groups

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._group.closed:
                raise RuntimeError("the state store is closed")
            conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._lock:
                self._readers.append(conn)
        return conn

    @contextlib.contextmanager
    def txn(self) -> Iterator[Txn]:
        """All-or-nothing group of reads and writes, isolated from other threads, durable
        when the block exits."""
        if getattr(self._in_txn, "active", False):
            raise RuntimeError("state store transactions do not nest")
        self._in_txn.active = True
        try:
            with self._group.body():
                yield _SqliteTxn(self._conn)
        finally:
            self._in_txn.active = False

    def get(self, kind: str, key: str) -> Record | None:
        return _SqliteTxn(self._reader()).get(kind, key)

    def list(
        self, kind: str, *, prefix: str = "", after: str = "", limit: int = 0
    ) -> list[tuple[str, Record]]:
        sql = "SELECT key, schema, data FROM records WHERE kind=? AND key > ?"
        args: list[Any] = [kind, after]
        if prefix:
            # keys in [prefix, prefix + U+10FFFF) start with prefix
            sql += " AND key >= ? AND key < ?"
            args += [prefix, prefix + "\U0010ffff"]
        sql += " ORDER BY key"
        if limit > 0:
            sql += " LIMIT ?"
            args.append(limit)
        rows = self._reader().execute(sql, args).fetchall()
        return [(key, _decode((schema, data))) for key, schema, data in rows]

    def put(self, kind: str, key: str, value: Record) -> None:
        with self.txn() as t:
            t.put(kind, key, value)

    def delete(self, kind: str, key: str) -> None:
        with self.txn() as t:
            t.delete(kind, key)

    def close(self) -> None:
        def close_connections() -> None:
            with self._lock:
                for conn in self._readers:
                    conn.close()
                self._readers.clear()
            self._conn.close()

        self._group.close(close_connections)
