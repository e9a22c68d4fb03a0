"""The arbiter: a compare-and-set record per mirrored volume on the control plane.

It decides who owns the volume (the generation) and which replicas are in sync.
Dropping a replica is a CAS here before any write is acknowledged without it;
when the arbiter cannot be reached the frontend keeps I/O blocked rather than
risk a split brain. SqliteArbiter is the embedded implementation; the cluster
issue puts etcd behind the same interface.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, field, replace
from typing import Protocol

from engine.errors import InvalidSpec, NotFound, Unavailable

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class VolumeRecord:
    volume_id: str
    generation: int
    owner: str  # the frontend instance that holds this generation
    replicas: dict[str, str] = field(default_factory=dict)  # replica id -> ReplicaState value
    version: int = 0  # CAS token, bumped on every successful put

    def with_replica(self, replica_id: str, state: str) -> VolumeRecord:
        return replace(self, replicas={**self.replicas, replica_id: state})

    def without_replica(self, replica_id: str) -> VolumeRecord:
        return replace(self, replicas={k: v for k, v in self.replicas.items() if k != replica_id})


class Arbiter(Protocol):
    def get(self, volume_id: str) -> VolumeRecord:
        """Raises NotFound, Unavailable."""

    def compare_and_set(self, record: VolumeRecord, expected_version: int) -> VolumeRecord | None:
        """Store record if the stored version is expected_version (0: absent).

        Returns the stored record (version bumped) or None when someone else won.
        Raises Unavailable when the store cannot be reached."""


class SqliteArbiter:
    """Embedded arbiter: one SQLite file (WAL, synchronous=FULL) on the control node."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS volumes (volume_id TEXT PRIMARY KEY,"
                       " version INTEGER NOT NULL, record TEXT NOT NULL)")

    def _db(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as e:
            raise Unavailable(f"arbiter {self.path}: {e}") from e
        return db

    def get(self, volume_id: str) -> VolumeRecord:
        try:
            db = self._db()
            try:
                row = db.execute(
                    "SELECT version, record FROM volumes WHERE volume_id=?", (volume_id,)
                ).fetchone()
            finally:
                db.close()
        except sqlite3.Error as e:
            raise Unavailable(f"arbiter {self.path}: {e}") from e
        if row is None:
            raise NotFound(volume_id)
        return _decode(row[1], row[0])

    def compare_and_set(self, record: VolumeRecord, expected_version: int) -> VolumeRecord | None:
        new = replace(record, version=expected_version + 1)
        text = _encode(new)
        try:
            db = self._db()
            try:
                db.execute("BEGIN IMMEDIATE")
                row = db.execute(
                    "SELECT version FROM volumes WHERE volume_id=?", (record.volume_id,)
                ).fetchone()
                current = row[0] if row else 0
                if current != expected_version:
                    db.execute("ROLLBACK")
                    return None
                db.execute(
                    "INSERT OR REPLACE INTO volumes (volume_id, version, record) VALUES (?,?,?)",
                    (record.volume_id, new.version, text),
                )
                db.execute("COMMIT")
            finally:
                db.close()
        except sqlite3.Error as e:
            raise Unavailable(f"arbiter {self.path}: {e}") from e
        return new


def _encode(r: VolumeRecord) -> str:
    return json.dumps(
        {
            "schema": SCHEMA_VERSION,
            "volume_id": r.volume_id,
            "generation": r.generation,
            "owner": r.owner,
            "replicas": r.replicas,
        },
        sort_keys=True,
    )


def _decode(text: str, version: int) -> VolumeRecord:
    d = json.loads(text)
    if d.get("schema") != SCHEMA_VERSION:
        raise InvalidSpec(f"arbiter record schema {d.get('schema')}")
    return VolumeRecord(d["volume_id"], d["generation"], d["owner"], dict(d["replicas"]), version)


def open_arbiter(url: str) -> Arbiter:
    """`sqlite:/path/to/file.db` for now; `etcd://...` comes with the cluster issue."""
    scheme, _, rest = url.partition(":")
    if scheme == "sqlite":
        return SqliteArbiter(rest)
    raise InvalidSpec(f"unknown arbiter {url!r}")
