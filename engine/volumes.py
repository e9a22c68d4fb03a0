"""Volume backing files in the pool, with their records.

A volume ID never becomes a path: each volume's file name is drawn at creation and
kept in its record (kind "backing"). Records come first: a create writes the record
(holding the drawn name) before the file exists, and a retry of a create cut short
finishes the file; a delete removes the file before the record. A pool file that no
record owns is an ORPHAN: reported by `reconcile()` and kept until an operator purges
it, never removed because a record is missing (a lost or restored store must not
delete data).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

from engine import crash
from engine.errors import AlreadyExists, InUse, InvalidSpec, NotFound, OutOfRange, StaleVersion
from engine.pool import Pool
from engine.state import Store

log = logging.getLogger(__name__)

KIND = "backing"
EMPTY, CLONE, RESTORE = "empty", "clone", "restore"  # how a volume's storage was made


# the sector size of a mirrored volume's device (its frontend's loop device on a FUSE file:
# mirror/frontend.py); its replicas keep it, so copies of them (local restores and clones)
# get the same and the filesystems on them mount
MIRROR_SECTOR_BYTES = 512

@dataclass(frozen=True)
class Backing:
    volume_id: str
    pool_name: str
    size_bytes: int
    sector_size_bytes: int
    created_at: float
    origin: str = EMPTY
    # the QoS spec this node enforces (engine/qos/tiers.py): the cluster record holds
    # the truth, this is the copy a node needs to apply it while the store is away
    qos_json: str = ""
    source_pool_name: str = ""  # what a clone or restore copies (to finish a retry)
    version: int = 0  # the newest cluster-record version this node acted on
    # How the volume was created to be used ("block", "mount"); () for records made before
    # this was kept: unknown, and only the device's own content protects it then.
    access_types: tuple[str, ...] = ()
    # The filesystem Tandem made on the volume (written before mkfs starts), and whether
    # mkfs finished: data found where mkfs was cut short is Tandem's own, not a user's.
    made_fs: str = ""
    made_fs_done: bool = False
    # "volume": staged on this node as itself; "replica": one copy of a mirrored volume,
    # reached only through the volume's frontend (never staged directly: writes must go to
    # every replica)
    role: str = "volume"

    @classmethod
    def from_record(cls, volume_id: str, rec: dict) -> Backing:
        rec = dict(rec)
        rec["access_types"] = tuple(rec.get("access_types", ()))
        return cls(volume_id=volume_id, **rec)

    def record(self) -> dict:
        rec = dict(vars(self))  # every field is flat: no need for asdict's deep copy
        del rec["volume_id"]
        return rec


class PoolObject(Protocol):
    """What a clone or restore needs of its source (a Backing or a snapshot)."""

    @property
    def pool_name(self) -> str: ...

    @property
    def sector_size_bytes(self) -> int: ...


def check_version(backing: Backing, version: int) -> None:
    """Refuse a call acting on an older cluster record than one already acted on."""
    if version and version < backing.version:
        raise StaleVersion(f"volume {backing.volume_id}: the call acts on record version "
                           f"{version}, this node already acted on {backing.version}")


def set_backing_qos(store: Store, volume_id: str, qos_json: str, version: int,
                    storage: str) -> None:
    """A backing record's tier, for any backend (storage: what it is, for the error)."""
    with store.txn() as t:
        rec = t.get(KIND, volume_id)
        if rec is None:
            raise NotFound(f"volume {volume_id} has no {storage} on this node")
        check_version(Backing.from_record(volume_id, rec), version)
        rec["qos_json"] = qos_json
        rec["version"] = max(version, rec.get("version", 0))
        t.put(KIND, volume_id, rec)


def set_backing_made_fs(store: Store, volume_id: str, fs_type: str, done: bool,
                        storage: str) -> Backing:
    """Record that Tandem is making (done=False) or has made fs_type on the volume."""
    with store.txn() as t:
        rec = t.get(KIND, volume_id)
        if rec is None:
            raise NotFound(f"volume {volume_id} has no {storage} on this node")
        rec["made_fs"], rec["made_fs_done"] = fs_type, done
        t.put(KIND, volume_id, rec)
    return Backing.from_record(volume_id, rec)


class VolumeFiles:
    def __init__(self, store: Store, pool: Pool):
        self.store = store
        self.pool = pool
        self.orphans: list[str] = []  # pool volumes no record owns (see reconcile)

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
        version: int = 0,
        access_types: tuple[str, ...] = (),
        role: str = "volume",
    ) -> Backing:
        """Create an empty sparse volume, a clone of a volume, or a restore of a snapshot.

        Clones and restores keep their source's sector size: a filesystem made on it
        needs the same one. A new, empty mirror replica has its frontend's (512 bytes),
        the device its filesystems are made on, so a local copy of it mounts too.
        The record is written first, holding the drawn pool name; a retry after a crash
        finds it and finishes the file.
        """
        existing = self.get(volume_id)
        if existing is not None:
            if existing.size_bytes != size_bytes:
                raise AlreadyExists(f"volume {volume_id} already has a backing file")
            if not self.pool.volume_exists(existing.pool_name):
                self._make(existing)  # a create cut short after its record
            return existing
        source = clone_from or restore_from
        sector = source.sector_size_bytes if source else \
            MIRROR_SECTOR_BYTES if role == "replica" else self.pool.sector_size_bytes
        origin = CLONE if clone_from else RESTORE if restore_from else EMPTY
        backing = Backing(volume_id, uuid.uuid4().hex, size_bytes, sector, time.time(), origin,
                          qos_json, source.pool_name if source else "", version,
                          tuple(sorted(set(access_types))), role=role)
        self.store.put(KIND, volume_id, backing.record())
        crash.point("volume-create-after-record")
        try:
            self._make(backing)
        except BaseException:
            # only our own, freshly named file can be there: nothing else holds it
            self.pool.delete_volume(backing.pool_name)
            self.store.delete(KIND, volume_id)
            raise
        return backing

    def _make(self, backing: Backing) -> None:
        if backing.origin == CLONE:
            self.pool.clone_volume(backing.source_pool_name, backing.pool_name)
            self.pool.resize_volume(backing.pool_name, backing.size_bytes)
        elif backing.origin == RESTORE:
            self.pool.restore_snapshot(backing.source_pool_name, backing.pool_name)
            self.pool.resize_volume(backing.pool_name, backing.size_bytes)
        else:
            self.pool.create_volume(backing.pool_name, backing.size_bytes)

    def delete(self, volume_id: str) -> None:
        """File first, record second: a crash in between leaves a record whose file is
        gone (the retry finishes), never a file nobody knows."""
        backing = self.get(volume_id)
        if backing is None:
            return
        self.pool.delete_volume(backing.pool_name)
        crash.point("volume-delete-after-file")
        self.store.delete(KIND, volume_id)

    check_version = staticmethod(check_version)  # the module's, for callers holding one

    def expand(self, volume_id: str, size_bytes: int, version: int = 0) -> Backing:
        backing = self.require(volume_id)
        self.check_version(backing, version)
        if size_bytes < backing.size_bytes:
            raise OutOfRange(
                f"volume {volume_id} is {backing.size_bytes} bytes; shrinking is not supported"
            )
        if size_bytes % backing.sector_size_bytes:
            raise InvalidSpec(f"size {size_bytes} is not a multiple of the sector size")
        # Growing a sparse file is atomic and idempotent: no intent needed.
        self.pool.resize_volume(backing.pool_name, size_bytes)
        grown = dataclasses.replace(backing, size_bytes=size_bytes,
                                    version=max(version, backing.version))
        if grown != backing:
            self.store.put(KIND, volume_id, grown.record())
        return grown

    def set_qos(self, volume_id: str, qos_json: str, version: int = 0) -> None:
        set_backing_qos(self.store, volume_id, qos_json, version, "backing file")

    def set_made_fs(self, volume_id: str, fs_type: str, done: bool) -> Backing:
        return set_backing_made_fs(self.store, volume_id, fs_type, done, "backing file")

    def all(self) -> list[Backing]:
        return [Backing.from_record(k, r) for k, r in self.store.list(KIND)]

    def reconcile(self) -> None:
        """Remake empty volumes a power cut took back; report the pool's orphans.

        An empty volume's creation is not forced to disk (on btrfs that would commit a
        transaction per CreateVolume): the first flush through its device does that. So if
        a power cut takes the creation back, nothing was ever flushed to the volume, and a
        fresh empty one of the same size is exactly what its user may expect to find.
        Pool volumes no record owns are orphans: listed, logged, kept.
        """
        known = set()
        for backing in self.all():
            known.add(backing.pool_name)
            if self.pool.volume_exists(backing.pool_name):
                continue
            if backing.origin == EMPTY:
                log.warning("remaking empty volume %s: its creation never reached the disk",
                            backing.volume_id)
                self.pool.create_volume(backing.pool_name, backing.size_bytes)
            else:
                log.error("volume %s (a %s) has lost its storage", backing.volume_id,
                          backing.origin)
        self.orphans = [name for name in self.pool.volumes() if name not in known]
        for name in self.orphans:
            log.warning("orphan pool volume %s: no record owns it; kept (`tandem-admin "
                        "orphans` lists it, `tandem-admin purge` removes it)", name)

    def purge_orphan(self, pool_name: str) -> None:
        """Remove a pool volume no record owns (an operator's explicit decision)."""
        if any(b.pool_name == pool_name for b in self.all()):
            raise InUse(f"pool volume {pool_name} belongs to a volume; it is not an orphan")
        if pool_name not in self.pool.volumes():
            raise NotFound(f"no pool volume {pool_name}")
        self.pool.delete_volume(pool_name)
        self.orphans = [n for n in self.orphans if n != pool_name]
