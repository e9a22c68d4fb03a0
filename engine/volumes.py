"""Volume backing files in the pool, with their records.

A volume ID never becomes a path: each volume's file name is drawn at creation and
kept in its record (kind "backing"). The invariant that makes crashes harmless: a
pool file that no record owns is garbage. A create writes the file before its record,
a delete removes the record before the file, and `reconcile()` removes unowned files.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

from engine import crash
from engine.errors import AlreadyExists, InvalidSpec, NotFound, OutOfRange
from engine.pool import Pool
from engine.state import Store

log = logging.getLogger(__name__)

KIND = "backing"
EMPTY, CLONE, RESTORE = "empty", "clone", "restore"  # how a volume's storage was made


@dataclass(frozen=True)
class Backing:
    volume_id: str
    pool_name: str
    size_bytes: int
    sector_size_bytes: int
    created_at: float
    origin: str = EMPTY
    qos_json: str = ""  # the volume's QoS spec (engine/qos/tiers.py), kept with it
    # How the volume was created to be used ("block", "mount"); () for records made before
    # this was kept: unknown, and only the device's own content protects it then.
    access_types: tuple[str, ...] = ()
    # The filesystem Tandem made on the volume (written before mkfs starts), and whether
    # mkfs finished: data found where mkfs was cut short is Tandem's own, not a user's.
    made_fs: str = ""
    made_fs_done: bool = False

    @classmethod
    def from_record(cls, volume_id: str, rec: dict) -> Backing:
        rec = dict(rec)
        rec["access_types"] = tuple(rec.get("access_types", ()))
        return cls(volume_id=volume_id, **rec)

    def record(self) -> dict:
        rec = dataclasses.asdict(self)
        del rec["volume_id"]
        return rec


class PoolObject(Protocol):
    """What a clone or restore needs of its source (a Backing or a snapshot)."""

    @property
    def pool_name(self) -> str: ...

    @property
    def sector_size_bytes(self) -> int: ...


class VolumeFiles:
    def __init__(self, store: Store, pool: Pool):
        self.store = store
        self.pool = pool

    def get(self, volume_id: str) -> Backing | None:
        rec = self.store.get(KIND, volume_id)
        return Backing.from_record(volume_id, rec) if rec else None

    def require(self, volume_id: str) -> Backing:
        backing = self.get(volume_id)
        if backing is None:
            raise NotFound(f"volume {volume_id} has no backing file on this node")
        return backing

    def path(self, backing: Backing) -> str:
        return self.pool.volume_path(backing.pool_name)

    def create(
        self,
        volume_id: str,
        size_bytes: int,
        *,
        clone_from: Backing | None = None,
        restore_from: PoolObject | None = None,
        qos_json: str = "",
        access_types: tuple[str, ...] = (),
    ) -> Backing:
        """Create an empty sparse volume, a clone of a volume, or a restore of a snapshot.

        Clones and restores keep their source's sector size: a filesystem made on it
        needs the same one.
        """
        source = clone_from or restore_from
        existing = self.store.get(KIND, volume_id)
        if existing is not None:
            if existing["size_bytes"] == size_bytes:
                return Backing.from_record(volume_id, existing)
            raise AlreadyExists(f"volume {volume_id} already has a backing file")
        sector = source.sector_size_bytes if source else self.pool.sector_size_bytes
        origin = CLONE if clone_from else RESTORE if restore_from else EMPTY
        backing = Backing(volume_id, uuid.uuid4().hex, size_bytes, sector, time.time(), origin,
                          qos_json, tuple(sorted(set(access_types))))
        # The file comes first, its record second: a crash in between leaves a file no
        # record owns, which reconcile() removes. One commit instead of an intent + done.
        try:
            if clone_from is not None:
                self.pool.clone_volume(clone_from.pool_name, backing.pool_name)
                self.pool.resize_volume(backing.pool_name, size_bytes)
            elif restore_from is not None:
                self.pool.restore_snapshot(restore_from.pool_name, backing.pool_name)
                self.pool.resize_volume(backing.pool_name, size_bytes)
            else:
                self.pool.create_volume(backing.pool_name, size_bytes)
        except BaseException:
            self.pool.delete_volume(backing.pool_name)
            raise
        crash.point("volume-create-after-file")
        self.store.put(KIND, volume_id, backing.record())
        return backing

    def delete(self, volume_id: str) -> None:
        """Record first, file second: a crash in between leaves an unowned file (reconciled)."""
        rec = self.store.get(KIND, volume_id)
        if rec is None:
            return
        self.store.delete(KIND, volume_id)
        crash.point("volume-delete-after-record")
        self.pool.delete_volume(rec["pool_name"])

    def expand(self, volume_id: str, size_bytes: int) -> Backing:
        backing = self.require(volume_id)
        if size_bytes < backing.size_bytes:
            raise OutOfRange(
                f"volume {volume_id} is {backing.size_bytes} bytes; shrinking is not supported"
            )
        if size_bytes % backing.sector_size_bytes:
            raise InvalidSpec(f"size {size_bytes} is not a multiple of the sector size")
        # Growing a sparse file is atomic and idempotent: no intent needed.
        self.pool.resize_volume(backing.pool_name, size_bytes)
        grown = dataclasses.replace(backing, size_bytes=size_bytes)
        self.store.put(KIND, volume_id, grown.record())
        return grown

    def set_qos(self, volume_id: str, qos_json: str) -> None:
        with self.store.txn() as t:
            rec = t.get(KIND, volume_id)
            if rec is None:
                raise NotFound(f"volume {volume_id} has no backing file on this node")
            rec["qos_json"] = qos_json
            t.put(KIND, volume_id, rec)

    def set_made_fs(self, volume_id: str, fs_type: str, done: bool) -> Backing:
        """Record that Tandem is making (done=False) or has made fs_type on the volume."""
        with self.store.txn() as t:
            rec = t.get(KIND, volume_id)
            if rec is None:
                raise NotFound(f"volume {volume_id} has no backing file on this node")
            rec["made_fs"], rec["made_fs_done"] = fs_type, done
            t.put(KIND, volume_id, rec)
        return Backing.from_record(volume_id, rec)

    def all(self) -> list[Backing]:
        return [Backing.from_record(k, r) for k, r in self.store.list(KIND)]

    def reconcile(self) -> None:
        """Drop storage no record owns; remake empty volumes a power cut took back.

        An empty volume's creation is not forced to disk (on btrfs that would commit a
        transaction per CreateVolume): the first flush through its device does that. So if
        a power cut takes the creation back, nothing was ever flushed to the volume, and a
        fresh empty one of the same size is exactly what its user may expect to find.
        """
        known = set()
        for volume_id, rec in self.store.list(KIND):
            backing = Backing.from_record(volume_id, rec)
            known.add(backing.pool_name)
            if self.pool.volume_exists(backing.pool_name):
                continue
            if backing.origin == EMPTY:
                log.warning("remaking empty volume %s: its creation never reached the disk",
                            volume_id)
                self.pool.create_volume(backing.pool_name, backing.size_bytes)
            else:
                log.error("volume %s (a %s) has lost its storage", volume_id, backing.origin)
        for name in self.pool.volumes():
            if name not in known:
                log.warning("removing pool volume %s: no record owns it", name)
                self.pool.delete_volume(name)
