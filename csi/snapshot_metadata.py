"""CSI SnapshotMetadata service (alpha): allocated and changed blocks of snapshots.

Reached through the external-snapshot-metadata sidecar, which terminates TLS and
authenticates the backup application; the sidecar talks to us on the CSI socket. Ranges
come from the snapshot files' extent maps (engine/changed_blocks.py): no data is read.
"""

from __future__ import annotations

from collections.abc import Iterator

from csi import validation
from csi.errors import invalid, not_found, translated_stream
from csi.snapshot_catalog import SnapshotCatalog, SnapshotRecord
from engine import changed_blocks
from engine.node_engine import NodeEngine
from proto import csi_pb2, csi_pb2_grpc

DEFAULT_MAX_RESULTS = 256
VARIABLE = csi_pb2.BlockMetadataType.VARIABLE_LENGTH


def _pages(ranges: list[changed_blocks.Range], starting_offset: int, max_results: int):
    """Ranges ending after starting_offset, max_results per page."""
    picked = [r for r in ranges if r.end_bytes > starting_offset]
    size = max_results or DEFAULT_MAX_RESULTS
    for i in range(0, len(picked), size):
        yield [csi_pb2.BlockMetadata(byte_offset=r.offset_bytes, size_bytes=r.length_bytes)
               for r in picked[i:i + size]]


class SnapshotMetadataService(csi_pb2_grpc.SnapshotMetadataServicer):
    def __init__(self, catalog: SnapshotCatalog, nodes: dict[str, NodeEngine]):
        self.catalog = catalog
        self.nodes = nodes

    def _path(self, snapshot_id: str) -> tuple[SnapshotRecord, str]:
        snap = self.catalog.snapshot(snapshot_id) if validation.well_formed_id(snapshot_id) \
            else None
        node = self.nodes.get(snap.node_id) if snap else None
        backing = node.snapshot(snapshot_id) if node else None
        if snap is None or node is None or backing is None:
            raise not_found(f"snapshot {snapshot_id!r} does not exist")
        return snap, node.snapshots.path(backing)

    @staticmethod
    def _check_window(req) -> None:
        if req.starting_offset < 0:
            raise invalid("starting_offset must not be negative")
        if req.max_results < 0:
            raise invalid("max_results must not be negative")

    @translated_stream
    def GetMetadataAllocated(self, req, context) -> Iterator:
        snapshot_id = validation.require(req.snapshot_id, "snapshot_id")
        self._check_window(req)
        snap, path = self._path(snapshot_id)
        for page in _pages(changed_blocks.allocated(path), req.starting_offset,
                           req.max_results):
            yield csi_pb2.GetMetadataAllocatedResponse(
                block_metadata_type=VARIABLE, volume_capacity_bytes=snap.size_bytes,
                block_metadata=page)

    @translated_stream
    def GetMetadataDelta(self, req, context) -> Iterator:
        base_id = validation.require(req.base_snapshot_id, "base_snapshot_id")
        target_id = validation.require(req.target_snapshot_id, "target_snapshot_id")
        self._check_window(req)
        base, base_path = self._path(base_id)
        target, target_path = self._path(target_id)
        if base.source_volume_id != target.source_volume_id:
            raise invalid("the two snapshots are of different volumes")
        for page in _pages(changed_blocks.delta(base_path, target_path), req.starting_offset,
                           req.max_results):
            yield csi_pb2.GetMetadataDeltaResponse(
                block_metadata_type=VARIABLE, volume_capacity_bytes=target.size_bytes,
                block_metadata=page)
