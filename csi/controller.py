"""CSI Controller service: volumes' life cycle, attachments, capacity.

A thin adapter: it validates, keeps the controller's records (csi/catalog.py) and asks
the owning node's engine to do the storage work.
"""

from __future__ import annotations

import logging
import time

import grpc

from csi import sizes, validation
from csi.catalog import Catalog, VolumeRecord, new_volume_id
from csi.config import TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY, Config
from csi.errors import RpcError, invalid, not_found, translated
from csi.idempotency import CreateAsk, incompatibility
from csi.locks import KeyLocks
from csi.snapshotter import Snapshotter
from engine import crash
from engine.errors import AlreadyExists, InUse, OutOfCapacity
from engine.filesystem import XFS_MIN_BYTES
from engine.node_engine import NodeEngine
from engine.node_volumes import KernelView
from engine.pool import PoolUsage
from engine.qos.admission import can_place, check_admission
from engine.qos.tiers import QosSpec, resolve_qos
from proto import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)

Cap = csi_pb2.ControllerServiceCapability.RPC
CAPABILITIES = (
    Cap.CREATE_DELETE_VOLUME,
    Cap.PUBLISH_UNPUBLISH_VOLUME,
    Cap.LIST_VOLUMES,
    Cap.GET_CAPACITY,
    Cap.EXPAND_VOLUME,
    Cap.LIST_VOLUMES_PUBLISHED_NODES,
    Cap.PUBLISH_READONLY,
    Cap.SINGLE_NODE_MULTI_WRITER,
    Cap.VOLUME_CONDITION,
    Cap.GET_VOLUME,
    Cap.MODIFY_VOLUME,
    Cap.CLONE_VOLUME,
    Cap.CREATE_DELETE_SNAPSHOT,
    Cap.LIST_SNAPSHOTS,
    Cap.GET_SNAPSHOT,  # csi-test master (v5.5) knows it; v5.4 failed any driver advertising it
)


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, config: Config, catalog: Catalog, nodes: dict[str, NodeEngine],
                 snapshotter: Snapshotter, locks: KeyLocks):
        self.config = config
        self.catalog = catalog
        self.nodes = nodes
        self.snapshotter = snapshotter
        self.locks = locks

    # --- helpers -----------------------------------------------------------------
    def _topology(self, node: NodeEngine) -> dict[str, str]:
        return {TOPOLOGY_NODE_KEY: node.identity.node_id, TOPOLOGY_ZONE_KEY: node.identity.zone}

    def _available_bytes(self, node: NodeEngine) -> int:
        usage = node.usage()
        thin = int((usage.free_bytes - usage.reserve_bytes) * self.config.overcommit_ratio)
        return max(0, thin - self.catalog.provisioned_bytes(node.identity.node_id))

    def _matches(self, node: NodeEngine, segments) -> bool:
        mine = self._topology(node)
        return all(mine.get(k) == v for k, v in segments.items())

    def _guaranteed(self, node: NodeEngine) -> dict[str, QosSpec]:
        """The QoS specs of the volumes placed on node (for admission of minima)."""
        return {v.volume_id: QosSpec.from_json(v.qos_json)
                for v in self.catalog.volumes()
                if v.node_id == node.identity.node_id and v.qos_json}

    def _room_problem(self, node: NodeEngine, size: int, qos: QosSpec) -> str:
        """Why the volume cannot go on node now ('' when it can)."""
        available = self._available_bytes(node)
        if size > available:
            return f"{size} bytes asked, {available} available on {node.identity.node_id}"
        if qos.min_iops and not can_place(node.iops_capacity, self._guaranteed(node), qos):
            return (f"{qos.min_iops} guaranteed IOPS asked, not free on "
                    f"{node.identity.node_id} (capacity {node.iops_capacity})")
        return ""

    def _place(self, req: csi_pb2.CreateVolumeRequest, size: int, qos: QosSpec,
               pinned: str = "") -> NodeEngine:
        """A node for the new volume that has room for its bytes and its guaranteed IOPS:
        `pinned` (a local source's node) or the best match of the topology asked for."""
        reqs = req.accessibility_requirements
        candidates = [n for n in self.nodes.values() if not pinned or n.identity.node_id == pinned]
        if reqs.requisite:
            candidates = [n for n in candidates
                          if any(self._matches(n, t.segments) for t in reqs.requisite)]
        if not candidates:
            raise OutOfCapacity("no node matches the volume's accessibility requirements")
        ordered = [n for topo in reqs.preferred for n in candidates
                   if self._matches(n, topo.segments)] + candidates
        problems = []
        for node in dict.fromkeys(ordered):  # preferred first, each node once
            problem = self._room_problem(node, size, qos)
            if not problem:
                return node
            problems.append(problem)
        raise OutOfCapacity("; ".join(problems))

    def _volume(self, vol: VolumeRecord) -> csi_pb2.Volume:
        node = self.nodes.get(vol.node_id)
        topology = [csi_pb2.Topology(segments=self._topology(node))] if node else [
            csi_pb2.Topology(segments={TOPOLOGY_NODE_KEY: vol.node_id, TOPOLOGY_ZONE_KEY: vol.zone})
        ]
        source = None
        if vol.source_kind == "volume":
            source = csi_pb2.VolumeContentSource(
                volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=vol.source_id))
        elif vol.source_kind == "snapshot":
            source = csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=vol.source_id))
        return csi_pb2.Volume(
            volume_id=vol.volume_id,
            capacity_bytes=vol.capacity_bytes,
            accessible_topology=topology,
            content_source=source,
        )

    def _condition(self, vol: VolumeRecord, usages: dict[str, PoolUsage] | None = None,
                   views: dict[str, KernelView] | None = None) -> csi_pb2.VolumeCondition:
        """`usages` and `views` cache each node's pool usage and kernel state across the
        entries of one ListVolumes."""
        node = self.nodes.get(vol.node_id)
        if node is None:
            return csi_pb2.VolumeCondition(abnormal=True, message=f"node {vol.node_id} is unknown")
        backing = node.volume(vol.volume_id)
        if backing is None or not node.pool.volume_exists(backing.pool_name):
            return csi_pb2.VolumeCondition(abnormal=True, message="backing file is missing")
        views = {} if views is None else views
        if vol.node_id not in views:
            views[vol.node_id] = node.kernel_view()
        lost = node.volume_condition(vol.volume_id, views[vol.node_id])  # devices, mounts
        if lost.abnormal:
            return csi_pb2.VolumeCondition(abnormal=True, message=lost.message)
        usages = {} if usages is None else usages
        if vol.node_id not in usages:
            usages[vol.node_id] = node.usage()
        usage = usages[vol.node_id]
        if usage.free_bytes <= usage.reserve_bytes:
            return csi_pb2.VolumeCondition(
                abnormal=True,
                message=f"pool on {vol.node_id} is nearly full ({usage.free_bytes} bytes free): "
                "writes to unallocated space may fail",
            )
        return csi_pb2.VolumeCondition(abnormal=False, message="")

    def _require_volume(self, volume_id: str) -> VolumeRecord:
        vol = self.catalog.volume(volume_id) if validation.well_formed_id(volume_id) else None
        if vol is None:
            raise not_found(f"volume {volume_id!r} does not exist")
        return vol

    # --- create / delete -----------------------------------------------------------
    @translated
    def CreateVolume(self, req: csi_pb2.CreateVolumeRequest, context):
        name = validation.check_name(req.name)
        access_types = validation.check_capabilities(req.volume_capabilities)
        params = validation.check_parameters(
            req.parameters, validation.VOLUME_PARAMETER_KEYS, "parameter")
        mutable = validation.check_parameters(
            req.mutable_parameters, validation.MUTABLE_PARAMETER_KEYS, "mutable parameter")
        qos = resolve_qos(params, mutable, self.config.tiers)
        minimum = sizes.MIN_VOLUME_BYTES
        if any(c.WhichOneof("access_type") == "mount" and c.mount.fs_type == "xfs"
               for c in req.volume_capabilities):
            minimum = XFS_MIN_BYTES
        size = sizes.volume_size(
            req.capacity_range.required_bytes, req.capacity_range.limit_bytes,
            self.config.default_volume_bytes, minimum)
        source_kind, source_id = self._content_source(req)
        ask = CreateAsk.from_request(req, params, mutable, source_kind, source_id)

        with self.locks.hold(f"name:{name}"):
            existing = self.catalog.volume_by_name(name)
            if existing is not None:
                # Before any capacity check: a retry must not fail for lack of room.
                why = incompatibility(existing, ask, {TOPOLOGY_NODE_KEY: existing.node_id,
                                                      TOPOLOGY_ZONE_KEY: existing.zone})
                if why:
                    raise AlreadyExists(f"volume {name!r} exists with {why}")
                return csi_pb2.CreateVolumeResponse(volume=self._volume(existing))
            source_node, source_bytes = "", 0
            if source_kind == "volume":
                source = self._require_volume(source_id)
                source_node, source_bytes = source.node_id, source.capacity_bytes
            elif source_kind == "snapshot":
                snap = self.snapshotter.require(source_id)
                source_node, source_bytes = snap.node_id, snap.size_bytes
            if source_bytes > size:
                raise RpcError(grpc.StatusCode.OUT_OF_RANGE,
                               f"the source holds {source_bytes} bytes, more than the "
                               f"{size} asked for")
            node = self._place(req, size, qos, pinned=source_node)
            vol = VolumeRecord(
                volume_id=new_volume_id(), name=name, capacity_bytes=size,
                node_id=node.identity.node_id, zone=node.identity.zone,
                access_types=tuple(sorted(set(access_types))), parameters=params,
                mutable_parameters=mutable, qos_json=qos.to_json(),
                source_kind=source_kind, source_id=source_id,
                created_at=time.time(), capabilities=tuple(sorted(ask.capabilities)),
                created_mutable_parameters=mutable, created_bytes=size,
            )
            # Storage first, record second: a crash in between leaves a backing volume
            # no record owns, which reconcile() removes at start-up. Two commits in all.
            if source_kind == "snapshot":
                node.restore_volume(vol.volume_id, size, qos, source_id,
                                    access_types=vol.access_types)
            else:
                node.create_volume(vol.volume_id, size, qos,
                                   clone_from_volume=source_id if source_kind == "volume" else "",
                                   access_types=vol.access_types)
            try:
                crash.point("create-volume-after-engine")
                self.catalog.add(vol)
            except BaseException:
                node.delete_volume(vol.volume_id)
                raise
            log.info("created volume %s (%s, %d bytes) on %s", vol.volume_id, name, size,
                     vol.node_id)
            return csi_pb2.CreateVolumeResponse(volume=self._volume(vol))

    def _content_source(self, req: csi_pb2.CreateVolumeRequest) -> tuple[str, str]:
        if not req.HasField("volume_content_source"):
            return "", ""
        src = req.volume_content_source
        kind = src.WhichOneof("type")
        if kind == "volume":
            validation.require(src.volume.volume_id, "volume_content_source.volume.volume_id")
            return "volume", src.volume.volume_id
        if kind == "snapshot":
            validation.require(src.snapshot.snapshot_id,
                               "volume_content_source.snapshot.snapshot_id")
            return "snapshot", src.snapshot.snapshot_id
        raise invalid("volume_content_source has no type")

    @translated
    def DeleteVolume(self, req: csi_pb2.DeleteVolumeRequest, context):
        volume_id = validation.require(req.volume_id, "volume_id")
        if not validation.well_formed_id(volume_id):
            return csi_pb2.DeleteVolumeResponse()  # never ours, so already gone
        with self.locks.hold(volume_id):
            vol = self.catalog.volume(volume_id)
            if vol is None:
                return csi_pb2.DeleteVolumeResponse()
            attached = self.catalog.attachments_of(volume_id)
            if attached:
                raise InUse(f"volume {volume_id} is still published to {', '.join(attached)}")
            node = self.nodes.get(vol.node_id)
            if node is not None and node.is_staged(volume_id):
                raise InUse(f"volume {volume_id} is still staged on {vol.node_id}")
            # Storage first: a crash in between leaves the record, abnormal ("backing file
            # is missing"), until the CO's retry of this delete removes it.
            if node is not None:
                node.delete_volume(volume_id)
            crash.point("delete-volume-after-engine")
            self.catalog.forget(vol)
            log.info("deleted volume %s (%s)", volume_id, vol.name)
        return csi_pb2.DeleteVolumeResponse()

    # --- publish -------------------------------------------------------------------
    @translated
    def ControllerPublishVolume(self, req, context) -> csi_pb2.ControllerPublishVolumeResponse:
        volume_id = validation.require(req.volume_id, "volume_id")
        node_id = validation.require(req.node_id, "node_id")
        if not req.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        kind = validation.check_capability(req.volume_capability)
        with self.locks.hold(volume_id):
            vol = self._require_volume(volume_id)
            if node_id not in self.nodes:
                raise not_found(f"node {node_id!r} is not known")
            if kind not in vol.access_types:
                raise invalid(f"volume {volume_id} was created for {', '.join(vol.access_types)}")
            if node_id != vol.node_id:
                raise InUse(f"volume {volume_id} is local to node {vol.node_id}")
            current = self.catalog.attachment(volume_id, node_id)
            if current is not None:
                if current["read_only"] != req.readonly:
                    raise RpcError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"volume {volume_id} is published to {node_id} with "
                                   f"readonly={current['read_only']}")
                return csi_pb2.ControllerPublishVolumeResponse(publish_context={})
            if self.catalog.attached_volume_count(node_id) >= self.config.max_volumes_per_node:
                raise OutOfCapacity(f"node {node_id} has its maximum of "
                                    f"{self.config.max_volumes_per_node} volumes attached")
            self.catalog.attach(volume_id, node_id, req.readonly)
        return csi_pb2.ControllerPublishVolumeResponse(publish_context={})

    @translated
    def ControllerUnpublishVolume(self, req, context) -> csi_pb2.ControllerUnpublishVolumeResponse:
        volume_id = validation.require(req.volume_id, "volume_id")
        if not validation.well_formed_id(volume_id):
            return csi_pb2.ControllerUnpublishVolumeResponse()
        with self.locks.hold(volume_id):
            nodes = [req.node_id] if req.node_id else list(self.catalog.attachments_of(volume_id))
            for node_id in nodes:
                self.catalog.detach(volume_id, node_id)
        return csi_pb2.ControllerUnpublishVolumeResponse()

    # --- queries -------------------------------------------------------------------
    @translated
    def ValidateVolumeCapabilities(self, req, context):
        volume_id = validation.require(req.volume_id, "volume_id")
        if not req.volume_capabilities:
            raise invalid("volume_capabilities are required")
        vol = self._require_volume(volume_id)
        validation.check_parameters(req.parameters, validation.VOLUME_PARAMETER_KEYS, "parameter")
        for cap in req.volume_capabilities:
            why = validation.unsupported_capability(cap)
            if not why and validation.access_type(cap) not in vol.access_types:
                why = f"volume was created for {', '.join(vol.access_types)}"
            if why:
                return csi_pb2.ValidateVolumeCapabilitiesResponse(message=why)
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=req.volume_context,
            volume_capabilities=req.volume_capabilities,
            parameters=req.parameters,
            mutable_parameters=req.mutable_parameters,
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    def _status(self, vol: VolumeRecord, usages: dict[str, PoolUsage] | None = None,
                views: dict[str, KernelView] | None = None):
        return dict(
            published_node_ids=sorted(self.catalog.attachments_of(vol.volume_id)),
            volume_condition=self._condition(vol, usages, views),
        )

    @translated
    def ListVolumes(self, req: csi_pb2.ListVolumesRequest, context) -> csi_pb2.ListVolumesResponse:
        if req.max_entries < 0:
            raise invalid("max_entries must not be negative")
        after = validation.page_start(req.starting_token)
        limit = req.max_entries
        vols = self.catalog.volumes(after=after, limit=limit + 1 if limit else 0)
        next_token = ""
        if limit and len(vols) > limit:
            vols = vols[:limit]
            next_token = validation.page_token(vols[-1].volume_id)
        usages: dict[str, PoolUsage] = {}  # one statvfs per node, not per entry
        views: dict[str, KernelView] = {}  # one reading of mounts and devices per node
        entries = [
            csi_pb2.ListVolumesResponse.Entry(
                volume=self._volume(v),
                status=csi_pb2.ListVolumesResponse.VolumeStatus(
                    **self._status(v, usages, views)),
            )
            for v in vols
        ]
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=next_token)

    @translated
    def ControllerGetVolume(self, req, context) -> csi_pb2.ControllerGetVolumeResponse:
        vol = self._require_volume(validation.require(req.volume_id, "volume_id"))
        return csi_pb2.ControllerGetVolumeResponse(
            volume=self._volume(vol),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(**self._status(vol)),
        )

    @translated
    def GetCapacity(self, req: csi_pb2.GetCapacityRequest, context) -> csi_pb2.GetCapacityResponse:
        params = validation.check_parameters(
            req.parameters, validation.VOLUME_PARAMETER_KEYS, "parameter")
        qos = resolve_qos(params, {}, self.config.tiers)
        for cap in req.volume_capabilities:
            if validation.unsupported_capability(cap):
                return csi_pb2.GetCapacityResponse(available_capacity=0)
        nodes = [n for n in self.nodes.values()
                 if not req.HasField("accessible_topology")
                 or self._matches(n, req.accessible_topology.segments)]
        # A segment that cannot keep the tier's minimum has no capacity for it, so the
        # scheduler (storage capacity tracking) only picks nodes where the minimum holds.
        nodes = [n for n in nodes if not qos.min_iops
                 or can_place(n.iops_capacity, self._guaranteed(n), qos)]
        per_node = [self._available_bytes(n) for n in nodes]
        return csi_pb2.GetCapacityResponse(
            available_capacity=sum(per_node),
            maximum_volume_size={"value": min(max(per_node, default=0), sizes.MAX_VOLUME_BYTES)},
            minimum_volume_size={"value": sizes.MIN_VOLUME_BYTES},
        )

    @translated
    def ControllerGetCapabilities(self, req, context):
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=csi_pb2.ControllerServiceCapability.RPC(type=c))
            for c in CAPABILITIES
        ])

    # --- changes to a live volume --------------------------------------------------
    @translated
    def ControllerExpandVolume(self, req, context) -> csi_pb2.ControllerExpandVolumeResponse:
        volume_id = validation.require(req.volume_id, "volume_id")
        if not req.HasField("capacity_range"):
            raise invalid("capacity_range is required")
        if req.HasField("volume_capability"):
            validation.check_capability(req.volume_capability)
        with self.locks.hold(volume_id):
            vol = self._require_volume(volume_id)
            rng = req.capacity_range
            size = sizes.volume_size(rng.required_bytes, rng.limit_bytes, vol.capacity_bytes)
            if size <= vol.capacity_bytes:
                return csi_pb2.ControllerExpandVolumeResponse(
                    capacity_bytes=vol.capacity_bytes, node_expansion_required=True)
            node = self.nodes[vol.node_id]
            growth = size - vol.capacity_bytes
            available = self._available_bytes(node)
            if growth > available:
                raise OutOfCapacity(f"growing by {growth} bytes; {available} bytes available")
            node.expand_volume(volume_id, size)
            self.catalog.save(vol.replace(capacity_bytes=size))
        # The loop device (and the filesystem) must be told on the node, block included.
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=size, node_expansion_required=True)

    @translated
    def ControllerModifyVolume(self, req, context) -> csi_pb2.ControllerModifyVolumeResponse:
        volume_id = validation.require(req.volume_id, "volume_id")
        mutable = validation.check_parameters(
            req.mutable_parameters, validation.MUTABLE_PARAMETER_KEYS, "mutable parameter")
        with self.locks.hold(volume_id):
            vol = self._require_volume(volume_id)
            merged = {**vol.mutable_parameters, **mutable}
            qos = resolve_qos(vol.parameters, merged, self.config.tiers)
            node = self.nodes.get(vol.node_id)
            if node is None:
                raise RpcError(grpc.StatusCode.UNAVAILABLE, f"node {vol.node_id} is unreachable")
            # InvalidSpec: the minimum can never fit the node (INVALID_ARGUMENT);
            # OutOfCapacity: no room now, the resizer retries (RESOURCE_EXHAUSTED).
            check_admission(node.iops_capacity, self._guaranteed(node), volume_id, qos)
            self.catalog.save(vol.replace(mutable_parameters=merged, qos_json=qos.to_json()))
            node.set_qos(volume_id, qos)
        return csi_pb2.ControllerModifyVolumeResponse()

    # --- snapshots (csi/snapshotter.py) -------------------------------------------
    @translated
    def CreateSnapshot(self, req, context):
        return self.snapshotter.create(req)

    @translated
    def DeleteSnapshot(self, req, context):
        return self.snapshotter.delete(req)

    @translated
    def ListSnapshots(self, req, context):
        return self.snapshotter.list(req)

    @translated
    def GetSnapshot(self, req, context):
        return self.snapshotter.get(req)


def reconcile(catalog: Catalog, nodes: dict[str, NodeEngine]) -> None:
    """At start-up: remove backing volumes no record owns (a create cut short)."""
    for node in nodes.values():
        for backing in node.files.all():
            if catalog.volume(backing.volume_id) is None:
                log.warning("removing volume %s from %s: no record owns it",
                            backing.volume_id, node.identity.node_id)
                node.delete_volume(backing.volume_id)
