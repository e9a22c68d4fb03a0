"""Snapshot RPCs (Controller and GroupController): validation and messages; the records
and the node calls are the control plane's (control/snapshots.py)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from control.records import GroupRecord, SnapshotRecord, request_hash
from control.snapshots import Snapshots
from csi import validation
from engine.errors import InvalidSpec, NotFound
from proto import csi_pb2

NO_PARAMETERS: frozenset[str] = frozenset()


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class Snapshotter:
    def __init__(self, snapshots: Snapshots):
        self.snapshots = snapshots

    # --- helpers -----------------------------------------------------------------
    def message(self, snap: SnapshotRecord) -> csi_pb2.Snapshot:
        return csi_pb2.Snapshot(
            size_bytes=snap.size_bytes, snapshot_id=snap.snapshot_id,
            source_volume_id=snap.source_volume_id, creation_time=_timestamp(snap.created_at),
            ready_to_use=True, group_snapshot_id=snap.group_id,
        )

    def require(self, snapshot_id: str) -> SnapshotRecord:
        if not validation.well_formed_id(snapshot_id):
            raise NotFound(f"snapshot {snapshot_id!r} does not exist")
        return self.snapshots.require_ready(snapshot_id)

    # --- single snapshots ----------------------------------------------------------
    def create(self, req: csi_pb2.CreateSnapshotRequest) -> csi_pb2.CreateSnapshotResponse:
        name = validation.check_name(req.name)
        source_id = validation.require(req.source_volume_id, "source_volume_id")
        params = validation.check_parameters(req.parameters, NO_PARAMETERS, "snapshot parameter")
        if not validation.well_formed_id(source_id):
            raise NotFound(f"source volume {source_id!r} does not exist")
        digest = request_hash({"name": name, "source": source_id, "parameters": params})
        snap = self.snapshots.create(name, source_id, digest)
        return csi_pb2.CreateSnapshotResponse(snapshot=self.message(snap))

    def delete(self, req: csi_pb2.DeleteSnapshotRequest) -> csi_pb2.DeleteSnapshotResponse:
        snapshot_id = validation.require(req.snapshot_id, "snapshot_id")
        if validation.well_formed_id(snapshot_id):
            self.snapshots.delete(snapshot_id)
        return csi_pb2.DeleteSnapshotResponse()

    def get(self, req: csi_pb2.GetSnapshotRequest) -> csi_pb2.GetSnapshotResponse:
        snap = self.require(validation.require(req.snapshot_id, "snapshot_id"))
        return csi_pb2.GetSnapshotResponse(snapshot=self.message(snap))

    def list(self, req: csi_pb2.ListSnapshotsRequest) -> csi_pb2.ListSnapshotsResponse:
        if req.max_entries < 0:
            raise InvalidSpec("max_entries must not be negative")
        entry = csi_pb2.ListSnapshotsResponse.Entry
        if req.snapshot_id:
            try:
                snap = self.require(req.snapshot_id)
            except NotFound:
                return csi_pb2.ListSnapshotsResponse()
            if req.source_volume_id and snap.source_volume_id != req.source_volume_id:
                return csi_pb2.ListSnapshotsResponse()
            return csi_pb2.ListSnapshotsResponse(entries=[entry(snapshot=self.message(snap))])
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
