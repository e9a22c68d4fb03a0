"""Snapshot RPCs (Controller and GroupController): validation and messages; the records
and the node calls are the control plane's (control/snapshots.py)."""

from __future__ import annotations

import logging

from google.protobuf.timestamp_pb2 import Timestamp

from control.backups import Backups
from control.records import READY, GroupRecord, SnapshotRecord, request_hash
from control.snapshots import Snapshots
from csi import validation
from engine.backup.manifest import Manifest
from engine.backup.targets import parse_snapshot_id
from engine.errors import EngineError, InvalidSpec, NotFound
from proto import csi_pb2

log = logging.getLogger(__name__)

NO_PARAMETERS: frozenset[str] = frozenset()
BACKUP_TARGET = "backupTarget"  # VolumeSnapshotClass parameter: upload to this target
SNAPSHOT_PARAMETERS = frozenset({BACKUP_TARGET})


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class Snapshotter:
    def __init__(self, snapshots: Snapshots, backups: Backups | None = None):
        self.snapshots = snapshots
        self.backups = backups

    # --- helpers -----------------------------------------------------------------
    def message(self, snap: SnapshotRecord) -> csi_pb2.Snapshot:
        return csi_pb2.Snapshot(
            size_bytes=snap.size_bytes, snapshot_id=snap.snapshot_id,
            source_volume_id=snap.source_volume_id, creation_time=_timestamp(snap.created_at),
            ready_to_use=snap.ready_to_use, group_snapshot_id=snap.group_id,
        )

    @staticmethod
    def bucket_message(snapshot_id: str, manifest: Manifest) -> csi_pb2.Snapshot:
        """A backup known only from its bucket (made by another cluster, or this one's
        record is gone): complete, so ready."""
        return csi_pb2.Snapshot(
            size_bytes=manifest.size_bytes, snapshot_id=snapshot_id,
            source_volume_id=manifest.volume_id, creation_time=_timestamp(manifest.created_at),
            ready_to_use=True)

    def require(self, snapshot_id: str) -> SnapshotRecord:
        if not validation.well_formed_id(snapshot_id) and parse_snapshot_id(snapshot_id) is None:
            raise NotFound(f"snapshot {snapshot_id!r} does not exist")
        return self.snapshots.require_ready(snapshot_id)

    def _backups(self) -> Backups:
        if self.backups is None:
            raise InvalidSpec("backups are not configured (--backup-targets)")
        return self.backups

    def find(self, snapshot_id: str, secrets: dict[str, str]) -> csi_pb2.Snapshot | None:
        """The snapshot's message, a backup's from its bucket when no record names it."""
        ref = parse_snapshot_id(snapshot_id)
        if ref is None:
            if not validation.well_formed_id(snapshot_id):
                return None
            found = self.snapshots.record(snapshot_id)
            ready = found is not None and found[0].state == READY
            return self.message(found[0]) if found is not None and ready else None
        found = self.snapshots.record(snapshot_id)
        if found is not None:
            snap = found[0]
            if snap.state != READY:
                return None
            if not snap.ready_to_use:
                try:  # progress, and the upload restarted if a restart stopped it
                    snap = self._backups().advance(snapshot_id, secrets)
                except EngineError as e:
                    log.info("backup %s: %s", snapshot_id, e)
            return self.message(snap)
        try:
            manifest = self._backups().manifest(ref, secrets, "ListSnapshots")
        except NotFound:
            return None
        return self.bucket_message(snapshot_id, manifest)

    def restore_source(self, snapshot_id: str, secrets: dict[str, str]) -> int:
        """The volume size of a backup a volume is to be restored from (NotFound when the
        bucket holds no complete backup of that ID)."""
        ref = parse_snapshot_id(snapshot_id)
        if ref is None:
            raise NotFound(f"backup {snapshot_id!r} does not exist")
        return self._backups().manifest(ref, secrets, "CreateVolume").size_bytes

    # --- single snapshots ----------------------------------------------------------
    def create(self, req: csi_pb2.CreateSnapshotRequest) -> csi_pb2.CreateSnapshotResponse:
        name = validation.check_name(req.name)
        source_id = validation.require(req.source_volume_id, "source_volume_id")
        params = validation.check_parameters(req.parameters, SNAPSHOT_PARAMETERS,
                                             "snapshot parameter")
        target = params.get(BACKUP_TARGET, "")
        if target:
            self._backups().check_target(target)
        if not validation.well_formed_id(source_id):
            raise NotFound(f"source volume {source_id!r} does not exist")
        digest = request_hash({"name": name, "source": source_id, "parameters": params})
        snap = self.snapshots.create(name, source_id, digest, backup_target=target)
        if snap.backup is not None and not snap.ready_to_use:
            # started, resumed or confirmed; ready_to_use once the bucket holds it all
            snap = self._backups().advance(snap.snapshot_id, dict(req.secrets))
        return csi_pb2.CreateSnapshotResponse(snapshot=self.message(snap))

    def delete(self, req: csi_pb2.DeleteSnapshotRequest) -> csi_pb2.DeleteSnapshotResponse:
        snapshot_id = validation.require(req.snapshot_id, "snapshot_id")
        if validation.well_formed_id(snapshot_id):
            self.snapshots.delete(snapshot_id)
        elif parse_snapshot_id(snapshot_id) is not None:
            secrets = dict(req.secrets)
            if not self.snapshots.delete(snapshot_id, secrets):
                # known only to its bucket (e.g. pre-provisioned in this cluster)
                self._backups().delete_data(snapshot_id, secrets)
        return csi_pb2.DeleteSnapshotResponse()

    def get(self, req: csi_pb2.GetSnapshotRequest) -> csi_pb2.GetSnapshotResponse:
        snapshot_id = validation.require(req.snapshot_id, "snapshot_id")
        found = self.find(snapshot_id, dict(req.secrets))
        if found is None:
            raise NotFound(f"snapshot {snapshot_id!r} does not exist")
        return csi_pb2.GetSnapshotResponse(snapshot=found)

    def list(self, req: csi_pb2.ListSnapshotsRequest) -> csi_pb2.ListSnapshotsResponse:
        if req.max_entries < 0:
            raise InvalidSpec("max_entries must not be negative")
        entry = csi_pb2.ListSnapshotsResponse.Entry
        if req.snapshot_id:
            found = self.find(req.snapshot_id, dict(req.secrets))
            if found is None or (req.source_volume_id
                                 and found.source_volume_id != req.source_volume_id):
                return csi_pb2.ListSnapshotsResponse()
            return csi_pb2.ListSnapshotsResponse(entries=[entry(snapshot=found)])
        after = validation.page_start(req.starting_token)
        snaps, last = self.snapshots.list_ready(after, req.max_entries, req.source_volume_id)
        return csi_pb2.ListSnapshotsResponse(
            entries=[entry(snapshot=self.message(s)) for s in snaps],
            next_token=validation.page_token(last) if last else "")

    # --- group snapshots -----------------------------------------------------------
    def group_message(self, group: GroupRecord) -> csi_pb2.VolumeGroupSnapshot:
        snaps = self.snapshots.members(group)
        return csi_pb2.VolumeGroupSnapshot(
            group_snapshot_id=group.group_id, snapshots=[self.message(s) for s in snaps],
            creation_time=_timestamp(group.created_at), ready_to_use=True)

    def create_group(self, req: csi_pb2.CreateVolumeGroupSnapshotRequest):
        name = validation.check_name(req.name)
        if not req.source_volume_ids:
            raise InvalidSpec("source_volume_ids are required")
        volume_ids = list(dict.fromkeys(req.source_volume_ids))
        for vid in volume_ids:
            validation.require(vid, "source_volume_ids entry")
            if not validation.well_formed_id(vid):
                raise NotFound(f"source volume {vid!r} does not exist")
        params = validation.check_parameters(req.parameters, NO_PARAMETERS,
                                             "group snapshot parameter")
        digest = request_hash({"name": name, "volumes": sorted(volume_ids),
                               "parameters": params})
        group = self.snapshots.create_group(name, volume_ids, digest)
        return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=self.group_message(group))

    def _require_group(self, group_id: str) -> GroupRecord:
        if not validation.well_formed_id(group_id):
            raise NotFound(f"group snapshot {group_id!r} does not exist")
        return self.snapshots.require_group(group_id)

    def get_group(self, req: csi_pb2.GetVolumeGroupSnapshotRequest):
        group = self._require_group(validation.require(req.group_snapshot_id,
                                                       "group_snapshot_id"))
        if req.snapshot_ids and set(req.snapshot_ids) != set(group.snapshot_ids):
            raise InvalidSpec("snapshot_ids do not match the group's snapshots")
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=self.group_message(group))

    def delete_group(self, req: csi_pb2.DeleteVolumeGroupSnapshotRequest):
        group_id = validation.require(req.group_snapshot_id, "group_snapshot_id")
        if not validation.well_formed_id(group_id):
            return csi_pb2.DeleteVolumeGroupSnapshotResponse()
        found = self.snapshots.group(group_id)
        if found is not None and req.snapshot_ids \
                and not set(req.snapshot_ids) <= set(found[0].snapshot_ids):
            raise InvalidSpec("snapshot_ids include snapshots outside this group")
        self.snapshots.delete_group(group_id)
        return csi_pb2.DeleteVolumeGroupSnapshotResponse()
