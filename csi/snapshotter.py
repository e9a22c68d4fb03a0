"""Snapshot RPCs (Controller and GroupController): validation, records, engine calls.

Storage first, record second, as for volumes: a crash in between leaves snapshot
storage no record owns, which start-up removes (see reconcile()).
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from csi import validation
from csi.catalog import Catalog, VolumeRecord
from csi.errors import RpcError, invalid, not_found
from csi.locks import KeyLocks
from csi.snapshot_catalog import (
    GroupRecord,
    SnapshotCatalog,
    SnapshotRecord,
    new_group_id,
    new_snapshot_id,
)
from engine import crash
from engine.errors import OutOfCapacity
from engine.node_engine import NodeEngine
from proto import csi_pb2

log = logging.getLogger(__name__)

NO_PARAMETERS: frozenset[str] = frozenset()


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class Snapshotter:
    def __init__(self, volumes: Catalog, snapshots: SnapshotCatalog,
                 nodes: dict[str, NodeEngine], locks: KeyLocks):
        self.volumes = volumes
        self.catalog = snapshots
        self.nodes = nodes
        self.locks = locks

    # --- helpers -----------------------------------------------------------------
    def message(self, snap: SnapshotRecord) -> csi_pb2.Snapshot:
        return csi_pb2.Snapshot(
            size_bytes=snap.size_bytes, snapshot_id=snap.snapshot_id,
            source_volume_id=snap.source_volume_id, creation_time=_timestamp(snap.created_at),
            ready_to_use=True, group_snapshot_id=snap.group_id,
        )

    def require(self, snapshot_id: str) -> SnapshotRecord:
        snap = self.catalog.snapshot(snapshot_id) if validation.well_formed_id(snapshot_id) \
            else None
        if snap is None:
            raise not_found(f"snapshot {snapshot_id!r} does not exist")
        return snap

    def _source_volume(self, volume_id: str) -> VolumeRecord:
        vol = self.volumes.volume(volume_id) if validation.well_formed_id(volume_id) else None
        if vol is None:
            raise not_found(f"source volume {volume_id!r} does not exist")
        return vol

    def _node(self, node_id: str) -> NodeEngine:
        node = self.nodes.get(node_id)
        if node is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"node {node_id} is not reachable")
        return node

    @staticmethod
    def _check_room(node: NodeEngine) -> None:
        usage = node.usage()
        if usage.free_bytes <= usage.reserve_bytes:
            raise OutOfCapacity(
                f"pool on {node.identity.node_id} is full ({usage.free_bytes} bytes free): "
                "a snapshot's copy-on-write needs room")

    # --- single snapshots ----------------------------------------------------------
    def create(self, req: csi_pb2.CreateSnapshotRequest) -> csi_pb2.CreateSnapshotResponse:
        name = validation.check_name(req.name)
        source_id = validation.require(req.source_volume_id, "source_volume_id")
        validation.check_parameters(req.parameters, NO_PARAMETERS, "snapshot parameter")
        with self.locks.hold(f"snapshot-name:{name}"):
            existing = self.catalog.snapshot_by_name(name)
            if existing is not None:
                if existing.source_volume_id != source_id:
                    raise RpcError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"snapshot {name!r} exists for volume "
                                   f"{existing.source_volume_id}")
                return csi_pb2.CreateSnapshotResponse(snapshot=self.message(existing))
            with self.locks.hold(source_id):
                vol = self._source_volume(source_id)
                node = self._node(vol.node_id)
                self._check_room(node)
                snapshot_id = new_snapshot_id()
                (backing,) = node.create_snapshots([(snapshot_id, source_id)])
                snap = SnapshotRecord(snapshot_id, name, source_id, vol.node_id,
                                      backing.size_bytes, backing.created_at)
                self._record([snap], node)
        log.info("created snapshot %s (%s) of %s", snapshot_id, name, source_id)
        return csi_pb2.CreateSnapshotResponse(snapshot=self.message(snap))

    def _record(self, snaps: list[SnapshotRecord], node: NodeEngine,
                group: GroupRecord | None = None) -> None:
        try:
            crash.point("create-snapshot-after-engine")
            self.catalog.add_snapshots(snaps, group)
        except BaseException:
            for snap in snaps:
                node.delete_snapshot(snap.snapshot_id)
            raise

    def delete(self, req: csi_pb2.DeleteSnapshotRequest) -> csi_pb2.DeleteSnapshotResponse:
        snapshot_id = validation.require(req.snapshot_id, "snapshot_id")
        if not validation.well_formed_id(snapshot_id):
            return csi_pb2.DeleteSnapshotResponse()
        with self.locks.hold(snapshot_id):
            self._delete(snapshot_id)
        return csi_pb2.DeleteSnapshotResponse()

    def _delete(self, snapshot_id: str) -> None:
        snap = self.catalog.snapshot(snapshot_id)
        if snap is None:
            return
        node = self.nodes.get(snap.node_id)
        if node is not None:
            node.delete_snapshot(snapshot_id)
        crash.point("delete-snapshot-after-engine")
        self.catalog.forget_snapshot(snap)
        log.info("deleted snapshot %s (%s)", snapshot_id, snap.name)

    def get(self, req: csi_pb2.GetSnapshotRequest) -> csi_pb2.GetSnapshotResponse:
        snap = self.require(validation.require(req.snapshot_id, "snapshot_id"))
        return csi_pb2.GetSnapshotResponse(snapshot=self.message(snap))

    def list(self, req: csi_pb2.ListSnapshotsRequest) -> csi_pb2.ListSnapshotsResponse:
        if req.max_entries < 0:
            raise invalid("max_entries must not be negative")
        entry = csi_pb2.ListSnapshotsResponse.Entry
        if req.snapshot_id:
            snap = self.catalog.snapshot(req.snapshot_id) \
                if validation.well_formed_id(req.snapshot_id) else None
            if snap is None or (req.source_volume_id
                                and snap.source_volume_id != req.source_volume_id):
                return csi_pb2.ListSnapshotsResponse()
            return csi_pb2.ListSnapshotsResponse(entries=[entry(snapshot=self.message(snap))])
        after = validation.page_start(req.starting_token)
        snaps = [s for s in self.catalog.snapshots(after=after)
                 if not req.source_volume_id or s.source_volume_id == req.source_volume_id]
        next_token = ""
        if req.max_entries and len(snaps) > req.max_entries:
            snaps = snaps[:req.max_entries]
            next_token = validation.page_token(snaps[-1].snapshot_id)
        return csi_pb2.ListSnapshotsResponse(
            entries=[entry(snapshot=self.message(s)) for s in snaps], next_token=next_token)

    # --- group snapshots -----------------------------------------------------------
    def group_message(self, group: GroupRecord) -> csi_pb2.VolumeGroupSnapshot:
        snaps = [s for s in (self.catalog.snapshot(i) for i in group.snapshot_ids) if s]
        return csi_pb2.VolumeGroupSnapshot(
            group_snapshot_id=group.group_id, snapshots=[self.message(s) for s in snaps],
            creation_time=_timestamp(group.created_at), ready_to_use=True)

    def create_group(self, req: csi_pb2.CreateVolumeGroupSnapshotRequest):
        name = validation.check_name(req.name)
        if not req.source_volume_ids:
            raise invalid("source_volume_ids are required")
        volume_ids = list(dict.fromkeys(req.source_volume_ids))
        for vid in volume_ids:
            validation.require(vid, "source_volume_ids entry")
        validation.check_parameters(req.parameters, NO_PARAMETERS, "group snapshot parameter")
        with self.locks.hold(f"group-name:{name}"):
            existing = self.catalog.group_by_name(name)
            if existing is not None:
                if set(existing.volume_ids) != set(volume_ids):
                    raise RpcError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"group snapshot {name!r} exists for other volumes")
                return csi_pb2.CreateVolumeGroupSnapshotResponse(
                    group_snapshot=self.group_message(existing))
            with self.locks.hold(*volume_ids):
                vols = [self._source_volume(v) for v in volume_ids]
                node_ids = {v.node_id for v in vols}
                if len(node_ids) > 1:
                    raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                                   "the volumes live on different nodes: a group snapshot "
                                   "needs them on one node")
                node = self._node(vols[0].node_id)
                self._check_room(node)
                group_id = new_group_id()
                members = [(new_snapshot_id(), v) for v in volume_ids]
                backings = node.create_snapshots(members)
                snaps = [SnapshotRecord(sid, f"{name}/{vid}", vid, node.identity.node_id,
                                        b.size_bytes, b.created_at, group_id)
                         for (sid, vid), b in zip(members, backings, strict=True)]
                group = GroupRecord(group_id, name, tuple(s for s, _ in members),
                                    tuple(volume_ids), min(b.created_at for b in backings))
                self._record(snaps, node, group)
        log.info("created group snapshot %s (%s) of %s", group_id, name, ", ".join(volume_ids))
        return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=self.group_message(group))

    def _require_group(self, group_id: str) -> GroupRecord:
        group = self.catalog.group(group_id) if validation.well_formed_id(group_id) else None
        if group is None:
            raise not_found(f"group snapshot {group_id!r} does not exist")
        return group

    def get_group(self, req: csi_pb2.GetVolumeGroupSnapshotRequest):
        group = self._require_group(validation.require(req.group_snapshot_id,
                                                       "group_snapshot_id"))
        if req.snapshot_ids and set(req.snapshot_ids) != set(group.snapshot_ids):
            raise invalid("snapshot_ids do not match the group's snapshots")
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=self.group_message(group))

    def delete_group(self, req: csi_pb2.DeleteVolumeGroupSnapshotRequest):
        group_id = validation.require(req.group_snapshot_id, "group_snapshot_id")
        if not validation.well_formed_id(group_id):
            return csi_pb2.DeleteVolumeGroupSnapshotResponse()
        with self.locks.hold(group_id):
            group = self.catalog.group(group_id)
            if group is None:
                return csi_pb2.DeleteVolumeGroupSnapshotResponse()
            if req.snapshot_ids and not set(req.snapshot_ids) <= set(group.snapshot_ids):
                raise invalid("snapshot_ids include snapshots outside this group")
            for sid in group.snapshot_ids:
                self._delete(sid)
            self.catalog.forget_group(group)
        return csi_pb2.DeleteVolumeGroupSnapshotResponse()


def reconcile(catalog: SnapshotCatalog, nodes: dict[str, NodeEngine]) -> None:
    """At start-up: remove snapshot storage no record owns (a create cut short)."""
    for node in nodes.values():
        for backing in node.snapshots.all():
            if catalog.snapshot(backing.snapshot_id) is None:
                log.warning("removing snapshot %s from %s: no record owns it",
                            backing.snapshot_id, node.identity.node_id)
                node.delete_snapshot(backing.snapshot_id)
