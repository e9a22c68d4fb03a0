"""CSI Controller service: a thin adapter over the control plane.

It validates requests (required fields first, before any lookup), turns them into the
control plane's terms (control/volumes.py, control/snapshots.py) and maps the records
back. It never reaches a node except through the node API in the registry.
"""

from __future__ import annotations

import logging

from control import mirrored, placement, policy, replica_report, topology
from control.node_api import SOURCE_BACKUP, Condition, VolumeSource
from control.records import VolumeRecord, request_hash
from control.registry import NodeRegistry
from control.snapshots import Snapshots
from control.volume_index import VolumeIndex
from control.volumes import VolumeRequest, Volumes
from csi import validation
from csi.config import Config
from csi.errors import translated
from csi.idempotency import create_ask
from csi.snapshotter import Snapshotter
from engine.backup.targets import parse_snapshot_id
from engine.errors import EngineError, InvalidSpec, NotFound, OutOfRange
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


def _capability_fields(cap: csi_pb2.VolumeCapability) -> list:
    kind = cap.WhichOneof("access_type")
    mount = [cap.mount.fs_type, sorted(cap.mount.mount_flags)] if kind == "mount" else []
    return [kind, int(cap.access_mode.mode), *mount]


def create_request_hash(req: csi_pb2.CreateVolumeRequest, params: dict[str, str],
                        mutable: dict[str, str], source: VolumeSource) -> str:
    """What makes two CreateVolume calls the same request. Not the accessibility
    requirements: the provisioner may recompute them on a retry (nodes come and go)."""
    return request_hash({
        "name": req.name,
        "required_bytes": req.capacity_range.required_bytes,
        "limit_bytes": req.capacity_range.limit_bytes,
        "capabilities": sorted(_capability_fields(c) for c in req.volume_capabilities),
        "parameters": params,
        "mutable_parameters": mutable,
        "source": [source.kind, source.source_id],
    })


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, config: Config, volumes: Volumes, snapshots: Snapshots,
                 snapshotter: Snapshotter, nodes: NodeRegistry, index: VolumeIndex):
        self.config = config
        self.volumes = volumes
        self.snapshots = snapshots
        self.snapshotter = snapshotter
        self.nodes = nodes
        self.index = index

    # --- helpers -----------------------------------------------------------------
    def _volume(self, vol: VolumeRecord) -> csi_pb2.Volume:
        source = None
        if vol.source_kind == "volume":
            source = csi_pb2.VolumeContentSource(
                volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=vol.source_id))
        elif vol.source_kind in ("snapshot", SOURCE_BACKUP):
            source = csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=vol.source_id))
        return csi_pb2.Volume(
            volume_id=vol.volume_id,
            capacity_bytes=vol.capacity_bytes,
            volume_context=mirrored.volume_context(vol),
            accessible_topology=[csi_pb2.Topology(segments=s) for s in vol.segments],
            content_source=source,
        )

    def _conditions(self, vols: list[VolumeRecord]) -> dict[str, csi_pb2.VolumeCondition]:
        """Each volume's condition from its node (one node call, one reading of the kernel
        and one of the pool per node, whatever the number of volumes)."""
        by_node: dict[str, list[str]] = {}
        found: dict[str, Condition] = {}
        for vol in vols:
            if vol.mirrored:
                found[vol.volume_id] = self._mirrored_condition(vol)
            else:
                by_node.setdefault(vol.node_id, []).append(vol.volume_id)
        for node_id, ids in by_node.items():
            found.update(self._node_condition(node_id, ids))
        return {vid: csi_pb2.VolumeCondition(abnormal=c.abnormal, message=c.message)
                for vid, c in found.items()}

    def _mirrored_condition(self, vol: VolumeRecord) -> Condition:
        """Each replica's state: in sync, out of sync (the arbiter's record), resyncing n%
        (what the serving frontend reports), node down."""
        mirrors = self.volumes.mirrors
        return replica_report.condition(replica_report.replica_reports(
            vol, mirrors.replica_states(vol.volume_id), mirrors.frontend_view(vol.volume_id),
            self.nodes.known))

    def _node_condition(self, node_id: str, volume_ids: list[str]) -> dict[str, Condition]:
        node = self.nodes.get(node_id)
        if node is None:
            return dict.fromkeys(volume_ids, Condition(True, f"node {node_id} is not reachable"))
        try:
            infos = {i.volume_id: i for i in node.volumes(tuple(volume_ids))}
            pool = self.nodes.info(node_id)
        except EngineError as e:
            return dict.fromkeys(volume_ids, Condition(True, f"node {node_id} did not answer: "
                                                             f"{e}"))
        full = pool.free_bytes <= pool.reserve_bytes
        out = {}
        for vid in volume_ids:
            info = infos.get(vid)
            if info is None:
                out[vid] = Condition(True, f"the volume's storage is missing on {node_id}")
            elif info.condition.abnormal:
                out[vid] = info.condition
            elif full:
                out[vid] = Condition(True, f"pool on {node_id} is nearly full "
                                           f"({pool.free_bytes} bytes free): writes to "
                                           "unallocated space may fail")
            else:
                out[vid] = Condition()
        return out

    def _require_volume(self, volume_id: str) -> VolumeRecord:
        if not validation.well_formed_id(volume_id):
            raise NotFound(f"volume {volume_id!r} does not exist")
        return self.volumes.require_ready(volume_id)[0]

    def _resolve_qos(self, params: dict[str, str], mutable: dict[str, str]) -> QosSpec:
        return resolve_qos(params, mutable, self.config.tiers)

    # --- create / delete -----------------------------------------------------------
    @translated
    def CreateVolume(self, req: csi_pb2.CreateVolumeRequest, context):
        name = validation.check_name(req.name)
        access_types = validation.check_capabilities(req.volume_capabilities)
        params = validation.check_parameters(
            req.parameters, validation.VOLUME_PARAMETER_KEYS, "parameter")
        mutable = validation.check_parameters(
            req.mutable_parameters, validation.MUTABLE_PARAMETER_KEYS, "mutable parameter")
        qos = self._resolve_qos(params, mutable)
        replicas, min_in_sync, remote_access = mirrored.parse_parameters(params)
        minimum = policy.MIN_VOLUME_BYTES
        if any(c.WhichOneof("access_type") == "mount" and c.mount.fs_type == "xfs"
               for c in req.volume_capabilities):
            minimum = policy.XFS_MIN_BYTES
        size = policy.volume_size(
            req.capacity_range.required_bytes, req.capacity_range.limit_bytes,
            self.config.default_volume_bytes, minimum)
        source = self._content_source(req, size)
        reqs = req.accessibility_requirements
        vol = self.volumes.create(VolumeRequest(
            name=name,
            request_hash=create_request_hash(req, params, mutable, source),
            size_bytes=size,
            access_types=tuple(access_types),
            parameters=params,
            mutable_parameters=mutable,
            qos=qos,
            source=source,
            constraints=placement.Constraints(
                requisite=tuple(dict(t.segments) for t in reqs.requisite),
                preferred=tuple(dict(t.segments) for t in reqs.preferred)),
            replicas=replicas, min_in_sync=min_in_sync, remote_access=remote_access,
            ask=create_ask(req, params, mutable, source.kind, source.source_id),
            secrets=dict(req.secrets),
        ))
        return csi_pb2.CreateVolumeResponse(volume=self._volume(vol))

    def _content_source(self, req: csi_pb2.CreateVolumeRequest, size: int) -> VolumeSource:
        if not req.HasField("volume_content_source"):
            return VolumeSource()
        src = req.volume_content_source
        kind = src.WhichOneof("type")
        if kind == "volume":
            source_id = validation.require(src.volume.volume_id,
                                           "volume_content_source.volume.volume_id")
            self._require_volume(source_id)
            return VolumeSource("volume", source_id)
        if kind == "snapshot":
            source_id = validation.require(src.snapshot.snapshot_id,
                                           "volume_content_source.snapshot.snapshot_id")
            if parse_snapshot_id(source_id) is not None:
                # a backup: restored from its bucket on any node, here or in another cluster
                backup_bytes = self.snapshotter.restore_source(source_id, dict(req.secrets))
                if backup_bytes > size:
                    raise OutOfRange(f"the backup holds a volume of {backup_bytes} bytes, "
                                     f"more than the {size} asked for")
                return VolumeSource(SOURCE_BACKUP, source_id)
            self.snapshotter.require(source_id)
            return VolumeSource("snapshot", source_id)
        raise InvalidSpec("volume_content_source has no type")

    @translated
    def DeleteVolume(self, req: csi_pb2.DeleteVolumeRequest, context):
        volume_id = validation.require(req.volume_id, "volume_id")
        if validation.well_formed_id(volume_id):  # anything else was never ours: gone
            self.volumes.delete(volume_id)
        return csi_pb2.DeleteVolumeResponse()

    # --- publish -------------------------------------------------------------------
    @translated
    def ControllerPublishVolume(self, req, context) -> csi_pb2.ControllerPublishVolumeResponse:
        volume_id = validation.require(req.volume_id, "volume_id")
        node_id = validation.require(req.node_id, "node_id")
        if not req.HasField("volume_capability"):
            raise InvalidSpec("volume_capability is required")
        kind = validation.check_capability(req.volume_capability)
        self._require_volume(volume_id)
        context = self.volumes.publish(volume_id, node_id, kind, req.readonly)
        return csi_pb2.ControllerPublishVolumeResponse(publish_context=context)

    @translated
    def ControllerUnpublishVolume(self, req, context) -> csi_pb2.ControllerUnpublishVolumeResponse:
        volume_id = validation.require(req.volume_id, "volume_id")
        if validation.well_formed_id(volume_id):
            self.volumes.unpublish(volume_id, req.node_id)
        return csi_pb2.ControllerUnpublishVolumeResponse()

    # --- queries -------------------------------------------------------------------
    @translated
    def ValidateVolumeCapabilities(self, req, context):
        volume_id = validation.require(req.volume_id, "volume_id")
        if not req.volume_capabilities:
            raise InvalidSpec("volume_capabilities are required")
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

    def _status(self, vol: VolumeRecord, condition: csi_pb2.VolumeCondition) -> dict:
        return dict(
            published_node_ids=sorted(a.node_id for a in self.volumes.attachments(vol.volume_id)),
            volume_condition=condition,
        )

    @translated
    def ListVolumes(self, req: csi_pb2.ListVolumesRequest, context) -> csi_pb2.ListVolumesResponse:
        if req.max_entries < 0:
            raise InvalidSpec("max_entries must not be negative")
        after = validation.page_start(req.starting_token)
        vols, last = self.volumes.list_ready(after, req.max_entries)
        conditions = self._conditions(vols)
        entries = [
            csi_pb2.ListVolumesResponse.Entry(
                volume=self._volume(v),
                status=csi_pb2.ListVolumesResponse.VolumeStatus(
                    **self._status(v, conditions[v.volume_id])),
            )
            for v in vols
        ]
        next_token = validation.page_token(last) if last else ""
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=next_token)

    @translated
    def ControllerGetVolume(self, req, context) -> csi_pb2.ControllerGetVolumeResponse:
        vol = self._require_volume(validation.require(req.volume_id, "volume_id"))
        return csi_pb2.ControllerGetVolumeResponse(
            volume=self._volume(vol),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
                **self._status(vol, self._conditions([vol])[vol.volume_id])),
        )

    @translated
    def GetCapacity(self, req: csi_pb2.GetCapacityRequest, context) -> csi_pb2.GetCapacityResponse:
        params = validation.check_parameters(
            req.parameters, validation.VOLUME_PARAMETER_KEYS, "parameter")
        qos = self._resolve_qos(params, {})
        replicas, _, _ = mirrored.parse_parameters(params)
        for cap in req.volume_capabilities:
            if validation.unsupported_capability(cap):
                return csi_pb2.GetCapacityResponse(available_capacity=0)
        if replicas > 1:
            return self._mirrored_capacity(req, qos, replicas)
        infos = [n for n in self.nodes.infos()
                 if not req.HasField("accessible_topology")
                 or topology.matches(n.node_id, n.zone, req.accessible_topology.segments)]
        # A segment that cannot keep the tier's minimum has no capacity for it, so the
        # scheduler (storage capacity tracking) only picks nodes where the minimum holds.
        infos = [n for n in infos if not qos.min_iops or policy.can_place(
            n.iops_capacity, self.index.guaranteed(n.node_id), qos)]
        per_node = [placement.available_bytes(n, self.index, self.config.overcommit_ratio)
                    for n in infos]
        return csi_pb2.GetCapacityResponse(
            available_capacity=sum(per_node),
            maximum_volume_size={"value": min(max(per_node, default=0),
                                              policy.MAX_VOLUME_BYTES)},
            minimum_volume_size={"value": policy.MIN_VOLUME_BYTES},
        )

    def _mirrored_capacity(self, req: csi_pb2.GetCapacityRequest, qos: QosSpec,
                           replicas: int) -> csi_pb2.GetCapacityResponse:
        """A segment's capacity for N replicas: the smaller of what its zone holds and the
        (N-1)th best of the other zones (nodes short of the tier's minimum count as 0)."""
        infos = [n for n in self.nodes.infos() if not qos.min_iops or policy.can_place(
            n.iops_capacity, self.index.guaranteed(n.node_id), qos)]
        zones = {n.zone for n in self.nodes.infos()
                 if not req.HasField("accessible_topology")
                 or topology.matches(n.node_id, n.zone, req.accessible_topology.segments)}
        available = placement.replica_capacity(infos, self.index,
                                               self.config.overcommit_ratio, zones, replicas)
        return csi_pb2.GetCapacityResponse(
            available_capacity=available,
            maximum_volume_size={"value": min(available, policy.MAX_VOLUME_BYTES)},
            minimum_volume_size={"value": policy.MIN_VOLUME_BYTES},
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
            raise InvalidSpec("capacity_range is required")
        if req.HasField("volume_capability"):
            validation.check_capability(req.volume_capability)
        vol = self._require_volume(volume_id)
        rng = req.capacity_range
        size = policy.volume_size(rng.required_bytes, rng.limit_bytes, vol.capacity_bytes)
        vol = self.volumes.expand(volume_id, size)
        # The loop device (and the filesystem) must be told on the node, block included.
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=vol.capacity_bytes, node_expansion_required=True)

    @translated
    def ControllerModifyVolume(self, req, context) -> csi_pb2.ControllerModifyVolumeResponse:
        volume_id = validation.require(req.volume_id, "volume_id")
        mutable = validation.check_parameters(
            req.mutable_parameters, validation.MUTABLE_PARAMETER_KEYS, "mutable parameter")
        self._require_volume(volume_id)
        self.volumes.modify(volume_id, mutable, self._resolve_qos)
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
