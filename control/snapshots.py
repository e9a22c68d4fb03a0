"""Snapshots and group snapshots in the cluster: the same intent protocol as volumes.

CREATING records (with the name's record) are committed before the node takes the
snapshot; READY once it confirmed; DELETING (a tombstone) before the node removes it.
A group's records (the group and each member) commit together, so the 128-operation
bound of a store commit caps a group at MAX_GROUP_MEMBERS volumes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from control.mirror_snapshots import MirrorSnapshots
from control.node_api import SnapshotMember
from control.records import (
    CREATING,
    DELETING,
    GROUP,
    GROUP_NAME,
    READY,
    SNAPSHOT,
    SNAPSHOT_NAME,
    BackupState,
    GroupRecord,
    NameRecord,
    SnapshotRecord,
    new_group_id,
    new_snapshot_id,
    page,
)
from control.registry import NodeRegistry
from control.store import Conflict, Delete, Put, Store
from control.tombstones import delete_lock
from control.volumes import CAS_ATTEMPTS, REFUSALS, Volumes
from engine import crash
from engine.backup.targets import BackupRef
from engine.errors import (
    AlreadyExists,
    Busy,
    EngineError,
    InUse,
    InvalidSpec,
    NotFound,
    OutOfCapacity,
    Precondition,
)
from engine.locks import KeyLocks

if TYPE_CHECKING:
    from control.backups import Backups

log = logging.getLogger(__name__)

MAX_GROUP_MEMBERS = 60  # 2 + 2 * members operations in one commit, at most 128


class Snapshots:
    def __init__(self, store: Store, nodes: NodeRegistry, volumes: Volumes, locks: KeyLocks,
                 intent_timeout_s: float = 600.0, clock: Callable[[], float] = time.time):
        self.store = store
        self.nodes = nodes
        self.volumes = volumes
        self.locks = locks
        self.intent_timeout_s = intent_timeout_s
        self.clock = clock
        self.mirrored = MirrorSnapshots(self)  # snapshots of mirrored volumes
        self.backups: Backups | None = None  # uploads and the bucket (control/backups.py)

    # --- reading ---------------------------------------------------------------------
    def record(self, snapshot_id: str) -> tuple[SnapshotRecord, int] | None:
        got = self.store.get(SNAPSHOT + snapshot_id)
        return (SnapshotRecord.from_value(got.value), got.version) if got else None

    def require_ready(self, snapshot_id: str) -> SnapshotRecord:
        found = self.record(snapshot_id)
        if found is None or found[0].state != READY:
            raise NotFound(f"snapshot {snapshot_id!r} does not exist")
        return found[0]

    def source_of(self, snapshot_id: str) -> tuple[str, int]:
        """(node, bytes) of a snapshot a volume is restored from."""
        snap = self.require_ready(snapshot_id)
        return snap.node_id, snap.size_bytes

    def copies_of(self, snapshot_id: str) -> tuple[tuple[str, ...], int]:
        """(every node holding a copy, bytes): a mirrored volume's snapshot has several."""
        snap = self.require_ready(snapshot_id)
        return snap.node_ids, snap.size_bytes

    def list_ready(self, after: str, limit: int,
                   source_volume_id: str = "") -> tuple[list[SnapshotRecord], str]:
        return page(self.store, SNAPSHOT, after, limit, SnapshotRecord.from_value,
                    lambda s: s.state == READY and (not source_volume_id
                                                    or s.source_volume_id == source_volume_id),
                    lambda s: s.snapshot_id)

    def group(self, group_id: str) -> tuple[GroupRecord, int] | None:
        got = self.store.get(GROUP + group_id)
        return (GroupRecord.from_value(got.value), got.version) if got else None

    def require_group(self, group_id: str) -> GroupRecord:
        found = self.group(group_id)
        if found is None or found[0].state != READY:
            raise NotFound(f"group snapshot {group_id!r} does not exist")
        return found[0]

    def members(self, group: GroupRecord) -> list[SnapshotRecord]:
        found = (self.record(sid) for sid in group.snapshot_ids)
        return [f[0] for f in found if f is not None]

    # --- create ----------------------------------------------------------------------
    def create(self, name: str, source_volume_id: str, request_hash: str,
               backup_target: str = "") -> SnapshotRecord:
        """backup_target: the snapshot is also a backup to that target (its ID names the
        target and the backup; the upload is control/backups.py's)."""
        with self.locks.hold(f"snapshot-name:{name}"):
            for _ in range(CAS_ATTEMPTS):
                existing = self.store.get(SNAPSHOT_NAME + name)
                if existing is not None:
                    return self._resume(name, NameRecord(**existing.value), request_hash)
                with self.locks.hold(source_volume_id):
                    vol, _ = self.volumes.require_ready(source_volume_id)
                    now = self.clock()
                    if vol.mirrored:
                        if backup_target:
                            raise Precondition(
                                f"volume {vol.volume_id} is mirrored: a snapshot of it cannot "
                                "be a backup yet (its copies are on several nodes); snapshot "
                                "it, restore the snapshot into a local volume, and back that "
                                "up")
                        snap = self.mirrored.intent(name, vol, request_hash,
                                                    new_snapshot_id(), now)
                        try:
                            version = self.store.commit([
                                Put(SNAPSHOT_NAME + name, {"object_id": snap.snapshot_id,
                                                           "request_hash": request_hash},
                                    expect=0),
                                Put(snap.key, snap.to_value(), expect=0)])
                        except Conflict:
                            continue
                        return self.mirrored.realize(snap, version, vol)
                    self._check_room(vol.node_id)
                    ref = BackupRef.new(backup_target) if backup_target else None
                    snap = SnapshotRecord(
                        snapshot_id=ref.snapshot_id if ref else new_snapshot_id(), name=name,
                        request_hash=request_hash,
                        state=CREATING, source_volume_id=source_volume_id,
                        node_id=vol.node_id, size_bytes=vol.capacity_bytes, created_at=now,
                        intent_deadline=now + self.intent_timeout_s,
                        backup=BackupState(ref.target, ref.backup_id) if ref else None)
                    try:
                        version = self.store.commit([
                            Put(SNAPSHOT_NAME + name, {"object_id": snap.snapshot_id,
                                                       "request_hash": request_hash}, expect=0),
                            Put(snap.key, snap.to_value(), expect=0)])
                    except Conflict:
                        continue
                    return self._realize([(snap, version)])[0]
        raise Busy(f"snapshot name {name!r} is contended; retry")

    def _resume(self, name: str, ref: NameRecord, request_hash: str) -> SnapshotRecord:
        if ref.request_hash != request_hash:
            raise AlreadyExists(f"snapshot {name!r} exists for another source volume or "
                                "with other parameters")
        found = self.record(ref.object_id)
        if found is None:
            raise Busy(f"snapshot name {name!r} points to a missing record; retry")
        snap, version = found
        if snap.state == READY:
            return snap
        if snap.state == CREATING:
            with self.locks.hold(snap.source_volume_id):
                if snap.mirrored:
                    return self.mirrored.resume(snap, version, self.clock())
                return self._realize([(snap, version)])[0]
        raise Busy(f"snapshot {snap.snapshot_id} is being deleted; retry")

    def _check_room(self, node_id: str) -> None:
        info = self.nodes.info(node_id, fresh=True)
        if info.free_bytes <= info.reserve_bytes:
            raise OutOfCapacity(f"pool on {node_id} is full ({info.free_bytes} bytes free): "
                                "a snapshot's copy-on-write needs room")

    def _realize(self, snaps: list[tuple[SnapshotRecord, int]],
                 group: tuple[GroupRecord, int] | None = None) -> list[SnapshotRecord]:
        """Take the intents' snapshots on their node (one instant), then confirm them all."""
        node = self.nodes.require(snaps[0][0].node_id)
        members = tuple(SnapshotMember(s.snapshot_id, s.source_volume_id) for s, _ in snaps)
        try:
            infos = node.create_snapshots(members)
        except REFUSALS:  # the node can never take it (NVMe): the intent ends at once
            if group is None:
                self._abandon_refused(snaps[0])
            raise
        crash.point("create-snapshot-after-engine")
        ready = [s.replace(state=READY, size_bytes=i.size_bytes, created_at=i.created_at,
                           intent_deadline=0.0)
                 for (s, _), i in zip(snaps, infos, strict=True)]
        ops: list[Put | Delete] = [Put(r.key, r.to_value(), expect=v)
                                   for r, (_, v) in zip(ready, snaps, strict=True)]
        if group is not None:
            done = group[0].replace(state=READY, intent_deadline=0.0,
                                    created_at=min(i.created_at for i in infos))
            ops.append(Put(done.key, done.to_value(), expect=group[1]))
        try:
            self.store.commit(ops)
        except Conflict:
            raise Busy("the snapshot was abandoned or changed meanwhile; retry") from None
        for r in ready:
            log.info("created snapshot %s (%s) of %s", r.snapshot_id, r.name, r.source_volume_id)
        return ready

    # --- delete ----------------------------------------------------------------------
    def delete(self, snapshot_id: str, secrets: dict[str, str] | None = None) -> bool:
        """False when no record names the snapshot (nothing was done)."""
        with delete_lock(self.locks, snapshot_id,
                         lambda: self._is_tombstone(snapshot_id)) as held:
            return self._delete(snapshot_id, secrets) if held else True

    def _is_tombstone(self, snapshot_id: str) -> bool:
        found = self.record(snapshot_id)
        return found is not None and found[0].state == DELETING

    def _delete(self, snapshot_id: str, secrets: dict[str, str] | None) -> bool:
        found = self.record(snapshot_id)  # under the lock
        if found is None:
            return False
        snap, version = found
        if snap.state != DELETING:
            snap, version = self._tombstone(snap, version)
        self.converge_deleted(snap, version, secrets or {})
        return True

    def _tombstone(self, snap: SnapshotRecord, version: int) -> tuple[SnapshotRecord, int]:
        tomb = snap.replace(state=DELETING)
        ops: list[Put | Delete] = [Put(snap.key, tomb.to_value(), expect=version)]
        ops += self._drop_name(SNAPSHOT_NAME + snap.name, snap.snapshot_id) if snap.name else []
        try:
            return tomb, self.store.commit(ops)
        except Conflict:
            raise Busy(f"snapshot {snap.snapshot_id} changed meanwhile; retry") from None

    def _drop_name(self, key: str, object_id: str) -> list[Put | Delete]:
        name = self.store.get(key)
        if name is not None and name.value["object_id"] == object_id:
            return [Delete(key, expect=name.version)]
        return []

    def converge_deleted(self, tomb: SnapshotRecord, version: int,
                         secrets: dict[str, str] | None = None) -> bool:
        """Remove a tombstone's storage, then the tombstone. False while its node is away
        (the tombstone waits for it); a backup leaves its bucket even then."""
        if tomb.mirrored:  # never a backup (refused at creation): its copies, then the record
            if not self.mirrored.converge_deleted(tomb):
                return False
            crash.point("delete-snapshot-after-engine")
            try:
                self.store.commit([Delete(tomb.key, expect=version)])
            except Conflict:
                return False
            log.info("deleted snapshot %s (%s)", tomb.snapshot_id, tomb.name)
            return True
        node = self.nodes.get(tomb.node_id)
        if node is not None:
            node.delete_snapshot(tomb.snapshot_id)  # a backup's upload stops with it
            crash.point("delete-snapshot-after-engine")
        backup = tomb.backup
        if backup is not None and backup.base_chosen and not backup.removed:
            # an upload may have begun. The bucket is no node's: its part goes now, while
            # the request's credentials are at hand, whether or not the node is there (an
            # upload still running there holds its lock: ABORTED until it ends; one that
            # has not begun never completes, engine/backup/repo.py)
            if self.backups is None:
                raise InvalidSpec(f"snapshot {tomb.snapshot_id} is a backup, and backups are "
                                  "not configured")
            self.backups.delete_data(tomb.snapshot_id, secrets or {})
            if node is None:  # the tombstone stays for the node: it need not come back here
                tomb = tomb.replace(backup=backup.replace(removed=True))
                try:
                    version = self.store.commit([Put(tomb.key, tomb.to_value(),
                                                     expect=version)])
                except Conflict:
                    raise Busy(f"snapshot {tomb.snapshot_id} changed meanwhile; "
                               "retry") from None
        if node is None:
            log.warning("snapshot %s deleted; its storage on %s goes when the node is back",
                        tomb.snapshot_id, tomb.node_id)
            return False
        try:
            self.store.commit([Delete(tomb.key, expect=version)])
        except Conflict:
            return False
        log.info("deleted snapshot %s (%s)", tomb.snapshot_id, tomb.name)
        return True

    def _abandon_refused(self, snap_version: tuple[SnapshotRecord, int]) -> None:
        try:
            self.abandon_intent(*snap_version)
        except EngineError as e:
            log.warning("the refused snapshot intent stays for now: %s", e)

    def abandon_intent(self, snap: SnapshotRecord, version: int) -> None:
        tomb, tomb_version = self._tombstone(snap, version)
        log.warning("abandoning snapshot %s (%s): not confirmed in time", snap.snapshot_id,
                    snap.name)
        self.converge_deleted(tomb, tomb_version)

    # --- groups ----------------------------------------------------------------------
    def create_group(self, name: str, volume_ids: list[str], request_hash: str) -> GroupRecord:
        if len(volume_ids) > MAX_GROUP_MEMBERS:
            raise InvalidSpec(f"a group snapshot holds at most {MAX_GROUP_MEMBERS} volumes")
        with self.locks.hold(f"group-name:{name}"):
            existing = self.store.get(GROUP_NAME + name)
            if existing is not None:
                return self._resume_group(name, NameRecord(**existing.value), request_hash)
            with self.locks.hold(*volume_ids):
                vols = [self.volumes.require_ready(v)[0] for v in volume_ids]
                mirrored_ones = [v.volume_id for v in vols if v.mirrored]
                if mirrored_ones:
                    raise Precondition(f"group snapshots of mirrored volumes are not "
                                       f"supported ({', '.join(mirrored_ones)}): snapshot "
                                       "each on its own")
                node_ids = {v.node_id for v in vols}
                if len(node_ids) > 1:
                    raise InUse("the volumes live on different nodes: a group snapshot needs "
                                "them on one node")
                node_id = vols[0].node_id
                self._check_room(node_id)
                now = self.clock()
                deadline = now + self.intent_timeout_s
                group = GroupRecord(new_group_id(), name, request_hash, CREATING, (),
                                    tuple(volume_ids), node_id, now, deadline)
                snaps = [SnapshotRecord(new_snapshot_id(), f"{name}/{v.volume_id}", "",
                                        CREATING, v.volume_id, node_id, v.capacity_bytes, now,
                                        group.group_id, deadline) for v in vols]
                group = group.replace(snapshot_ids=tuple(s.snapshot_id for s in snaps))
                ops: list[Put | Delete] = [
                    Put(GROUP_NAME + name, {"object_id": group.group_id,
                                            "request_hash": request_hash}, expect=0),
                    Put(group.key, group.to_value(), expect=0),
                    *(Put(s.key, s.to_value(), expect=0) for s in snaps)]
                try:
                    version = self.store.commit(ops)
                except Conflict:
                    raise Busy(f"group snapshot name {name!r} was taken meanwhile; "
                               "retry") from None
                self._realize([(s, version) for s in snaps], (group, version))
                return self.require_group(group.group_id)

    def _resume_group(self, name: str, ref: NameRecord, request_hash: str) -> GroupRecord:
        if ref.request_hash != request_hash:
            raise AlreadyExists(f"group snapshot {name!r} exists for other volumes")
        found = self.group(ref.object_id)
        if found is None:
            raise Busy(f"group snapshot name {name!r} points to a missing record; retry")
        group, version = found
        if group.state == READY:
            return group
        if group.state == CREATING:
            snaps = [self.record(sid) for sid in group.snapshot_ids]
            if any(s is None for s in snaps):
                raise Busy(f"group snapshot {group.group_id} is incomplete; retry")
            with self.locks.hold(*group.volume_ids):
                self._realize([s for s in snaps if s is not None], (group, version))
            return self.require_group(group.group_id)
        raise Busy(f"group snapshot {group.group_id} is being deleted; retry")

    def delete_group(self, group_id: str) -> None:
        with self.locks.hold(group_id):
            found = self.group(group_id)
            if found is None:
                return
            group, version = found
            if group.state != DELETING:
                tomb = group.replace(state=DELETING)
                ops: list[Put | Delete] = [Put(group.key, tomb.to_value(), expect=version)]
                ops += self._drop_name(GROUP_NAME + group.name, group_id)
                for sid in group.snapshot_ids:
                    member = self.record(sid)
                    if member is not None and member[0].state != DELETING:
                        ops.append(Put(member[0].key,
                                       member[0].replace(state=DELETING).to_value(),
                                       expect=member[1]))
                try:
                    version = self.store.commit(ops)
                except Conflict:
                    raise Busy(f"group snapshot {group_id} changed meanwhile; retry") from None
                group = tomb
            self.converge_group_deleted(group, version)

    def converge_group_deleted(self, tomb: GroupRecord, version: int) -> bool:
        done = True
        for sid in tomb.snapshot_ids:
            member = self.record(sid)
            if member is not None:
                done = self.converge_deleted(*member) and done
        if not done:
            return False
        try:
            self.store.commit([Delete(tomb.key, expect=version)])
        except Conflict:
            return False
        log.info("deleted group snapshot %s (%s)", tomb.group_id, tomb.name)
        return True
