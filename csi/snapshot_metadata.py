"""CSI SnapshotMetadata service (alpha): allocated and changed blocks of snapshots.

Reached through the external-snapshot-metadata sidecar, which terminates TLS and
authenticates the backup application; the sidecar talks to us on the CSI socket. Ranges
come from the snapshot files' extent maps (engine/changed_blocks.py): no data is read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from control.node_api import ByteRange
from control.records import SnapshotRecord
from control.registry import NodeRegistry
from control.snapshots import Snapshots
from csi import validation
from csi.errors import translated_stream
from engine.errors import InvalidSpec, NotFound
from proto import csi_pb2, csi_pb2_grpc

DEFAULT_MAX_RESULTS = 256
VARIABLE = csi_pb2.BlockMetadataType.VARIABLE_LENGTH


def _pages(ranges: Sequence[ByteRange], starting_offset: int, max_results: int):
    """Ranges ending after starting_offset, max_results per page."""
    picked = [r for r in ranges if r.end_bytes > starting_offset]
    size = max_results or DEFAULT_MAX_RESULTS
    for i in range(0, len(picked), size):
        yield [csi_pb2.BlockMetadata(byte_offset=r.offset_bytes, size_bytes=r.length_bytes)
               for r in picked[i:i + size]]


class SnapshotMetadataService(csi_pb2_grpc.SnapshotMetadataServicer):
    def __init__(self, snapshots: Snapshots, nodes: NodeRegistry):
        self.snapshots = snapshots
        self.nodes = nodes

    def _snapshot(self, snapshot_id: str) -> SnapshotRecord:
        if not validation.well_formed_id(snapshot_id):
            raise NotFound(f"snapshot {snapshot_id!r} does not exist")
        return self.snapshots.require_ready(snapshot_id)

    @staticmethod
    def _check_window(req) -> None:
        if req.starting_offset < 0:
            raise InvalidSpec("starting_offset must not be negative")
        if req.max_results < 0:
            raise InvalidSpec("max_results must not be negative")

    @translated_stream
    def GetMetadataAllocated(self, req, context) -> Iterator:
        snapshot_id = validation.require(req.snapshot_id, "snapshot_id")
        self._check_window(req)
        snap = self._snapshot(snapshot_id)
        ranges = self.nodes.require(snap.node_id).allocated_ranges(snapshot_id)
        for page in _pages(ranges, req.starting_offset, req.max_results):
            yield csi_pb2.GetMetadataAllocatedResponse(
                block_metadata_type=VARIABLE, volume_capacity_bytes=snap.size_bytes,
                block_metadata=page)

    @translated_stream
    def GetMetadataDelta(self, req, context) -> Iterator:
        base_id = validation.require(req.base_snapshot_id, "base_snapshot_id")
        target_id = validation.require(req.target_snapshot_id, "target_snapshot_id")
        self._check_window(req)
        base = self._snapshot(base_id)
        target = self._snapshot(target_id)
        if base.source_volume_id != target.source_volume_id:
            raise InvalidSpec("the two snapshots are of different volumes")
        if base.node_id != target.node_id:
            raise InvalidSpec("the two snapshots are on different nodes")
        ranges = self.nodes.require(target.node_id).changed_ranges(base_id, target_id)
        for page in _pages(ranges, req.starting_offset, req.max_results):
            yield csi_pb2.GetMetadataDeltaResponse(
                block_metadata_type=VARIABLE, volume_capacity_bytes=target.size_bytes,
                block_metadata=page)
