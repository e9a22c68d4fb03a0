"""Snapshots of backing volumes: consistent, copy-on-write, and crash-safe.

Record first (kind "snapshot-backing", holding the drawn pool name), storage second: a
retry after a crash finds the record and takes the snapshot then. Snapshot storage no
record owns is an orphan: reported by reconcile(), never removed because a record is
missing. A mounted volume is frozen for the instant of the snapshot; a block volume's
acknowledged writes are already in its file (direct I/O), and the snapshot is atomic
with respect to the writes in flight.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import NoReturn

from engine import crash
from engine.errors import InUse, NotFound, Precondition
from engine.freeze import Freezer
from engine.node_volumes import BLOCK, MOUNT, NodeVolumes
from engine.pool import Pool
from engine.state import Store
from engine.volumes import Backing, VolumeFiles

log = logging.getLogger(__name__)

KIND = "snapshot-backing"


@dataclass(frozen=True)
class SnapshotBacking:
    snapshot_id: str
    pool_name: str
    source_volume_id: str
    size_bytes: int
    sector_size_bytes: int
    created_at: float

    def record(self) -> dict:
        rec = asdict(self)
        del rec["snapshot_id"]
        return rec


class Snapshots:
    def __init__(self, store: Store, pool: Pool, files: VolumeFiles, volumes: NodeVolumes,
                 freezer: Freezer):
        self.store = store
        self.pool = pool
        self.files = files
        self.volumes = volumes
        self.freezer = freezer
        self.orphans: list[str] = []  # pool snapshots no record owns (see reconcile)

    def get(self, snapshot_id: str) -> SnapshotBacking | None:
        rec = self.store.get(KIND, snapshot_id)
        return SnapshotBacking(snapshot_id=snapshot_id, **rec) if rec else None

    def require(self, snapshot_id: str) -> SnapshotBacking:
        snap = self.get(snapshot_id)
        if snap is None:
            raise NotFound(f"snapshot {snapshot_id} has no storage on this node")
        return snap

    def path(self, snap: SnapshotBacking) -> str:
        return self.pool.snapshot_path(snap.pool_name)

    def all(self) -> list[SnapshotBacking]:
        return [SnapshotBacking(snapshot_id=k, **r) for k, r in self.store.list(KIND)]

    # --- taking them -----------------------------------------------------------------
    def create(self, snapshot_id: str, volume_id: str) -> SnapshotBacking:
        return self.create_group([(snapshot_id, volume_id)], allow_block_in_use=True)[0]

    def create_group(
        self, members: list[tuple[str, str]], *, allow_block_in_use: bool = False,
        quiesce: bool = True,
    ) -> list[SnapshotBacking]:
        """Snapshot (snapshot_id, volume_id) pairs at one instant; idempotent per member.

        Mounted members are frozen together. A staged block member cannot be paused here
        (no device-mapper suspend on this kernel), so in a group of more than one it is
        refused rather than snapshotted at a different instant from the others.
        quiesce=False: taken as they are, the caller has them at rest (a mirror replica
        under its volume's write barrier, held by the controller).
        """
        existing = {sid: self.get(sid) for sid, _ in members}
        for sid, vid in members:
            snap = existing[sid]
            if snap is not None and snap.source_volume_id != vid:
                raise InUse(f"snapshot {sid} exists for volume {snap.source_volume_id}")
        # recorded but not taken (a crash in between): taken now, as a retry would
        todo = [(sid, vid) for sid, vid in members
                if existing[sid] is None
                or not self.pool.snapshot_exists(existing[sid].pool_name)]  # type: ignore[union-attr]
        if not todo:
            return [existing[sid] for sid, _ in members]  # type: ignore[misc]
        backings = {vid: self.files.require(vid) for _, vid in todo}
        planned = [existing[sid] or SnapshotBacking(
            sid, uuid.uuid4().hex, vid, backings[vid].size_bytes,
            backings[vid].sector_size_bytes, time.time()) for sid, vid in todo]
        with self.store.txn() as t:
            for snap in planned:
                t.put(KIND, snap.snapshot_id, snap.record())
        crash.point("snapshot-after-record")
        made: list[SnapshotBacking] = []
        at_rest = self.quiesced(list(backings), allow_block_in_use or len(members) == 1) \
            if quiesce else contextlib.nullcontext()
        with at_rest:
            crash.point("snapshot-after-freeze")
            for snap in planned:
                try:
                    self.pool.snapshot_volume(backings[snap.source_volume_id].pool_name,
                                              snap.pool_name)
                except BaseException:
                    for done in [*made, snap]:
                        self.pool.delete_snapshot(done.pool_name)
                    with self.store.txn() as t:
                        for undo in planned:
                            t.delete(KIND, undo.snapshot_id)
                    raise
                made.append(snap)
        crash.point("snapshot-after-storage")
        return [existing[sid] or self.require(sid) for sid, _ in members]

    @contextlib.contextmanager
    def quiesced(self, volume_ids: list[str], allow_block_in_use: bool) -> Iterator[None]:
        """The volumes at rest for the instant of a copy-on-write copy: mounted ones frozen
        together (flushed, no new writes), block ones flushed. A staged block volume cannot
        be paused here (no device-mapper suspend on this kernel): with allow_block_in_use
        False it is refused rather than copied at a different instant from the others."""
        mount_points, block_volumes = [], []
        for vid in volume_ids:
            stage = self.volumes.stage_record(vid)
            if stage is None:
                continue
            if stage.access_type == MOUNT:
                # frozen only where the kernel shows it mounted: after a reboot the record
                # says staged, and freezing the bare directory freezes the host's filesystem
                mounted = self.volumes.mounted_staging_path(vid)
                if mounted:
                    mount_points.append(mounted)
            elif stage.access_type == BLOCK:
                if not allow_block_in_use:
                    raise InUse(
                        f"volume {vid} is a block volume in use: a plain loop device cannot be "
                        "paused, so it cannot be snapshotted at the same instant as the other "
                        "members; unstage it or snapshot it on its own")
                block_volumes.append(vid)
        with self.freezer.frozen(mount_points):
            for vid in block_volumes:
                self.volumes.flush(vid)  # a buffered fallback device's cache reaches the file
            yield

    def delete(self, snapshot_id: str) -> None:
        """Storage first, record second: a crash in between leaves a record whose storage
        is gone (the retry finishes), never storage nobody knows."""
        snap = self.get(snapshot_id)
        if snap is None:
            return
        self.pool.delete_snapshot(snap.pool_name)
        crash.point("snapshot-delete-after-storage")
        self.store.delete(KIND, snapshot_id)

    def restore(self, snapshot_id: str, volume_id: str, size_bytes: int,
                qos_json: str = "", access_types: tuple[str, ...] = ()) -> Backing:
        return self.files.create(volume_id, size_bytes, restore_from=self.require(snapshot_id),
                                 qos_json=qos_json, access_types=access_types)

    # --- start-up --------------------------------------------------------------------
    def reconcile(self) -> None:
        """Report snapshot storage no record owns (kept until an operator purges it)."""
        known = {s.pool_name for s in self.all()}
        self.orphans = [name for name in self.pool.snapshots() if name not in known]
        for name in self.orphans:
            log.warning("orphan pool snapshot %s: no record owns it; kept", name)

    def purge_orphan(self, pool_name: str) -> None:
        if any(s.pool_name == pool_name for s in self.all()):
            raise InUse(f"pool snapshot {pool_name} belongs to a snapshot; not an orphan")
        if pool_name not in self.pool.snapshots():
            raise NotFound(f"no pool snapshot {pool_name}")
        self.pool.delete_snapshot(pool_name)
        self.orphans = [n for n in self.orphans if n != pool_name]


class NoSnapshots:
    """The snapshots of a backend without copy-on-write (NVMe namespaces): there are none,
    and making one is refused with why (CSI FAILED_PRECONDITION)."""

    def __init__(self, reason: str):
        self.reason = reason
        self.orphans: list[str] = []

    def get(self, snapshot_id: str) -> SnapshotBacking | None:
        return None

    def require(self, snapshot_id: str) -> SnapshotBacking:
        raise NotFound(f"snapshot {snapshot_id} has no storage on this node")

    def path(self, snap: SnapshotBacking) -> str:
        raise Precondition(self.reason)

    def all(self) -> list[SnapshotBacking]:
        return []

    def create(self, snapshot_id: str, volume_id: str) -> SnapshotBacking:
        raise Precondition(f"snapshots cannot be taken: {self.reason}")

    def create_group(self, members: list[tuple[str, str]], *,
                     allow_block_in_use: bool = False,
                     quiesce: bool = True) -> list[SnapshotBacking]:
        raise Precondition(f"snapshots cannot be taken: {self.reason}")

    def delete(self, snapshot_id: str) -> None:
        return None  # none was ever made here: gone already

    def quiesced(self, volume_ids: list[str], allow_block_in_use: bool) -> NoReturn:
        raise Precondition(self.reason)

    def reconcile(self) -> None:
        return None

    def purge_orphan(self, pool_name: str) -> None:
        raise NotFound(f"no pool snapshot {pool_name}")
