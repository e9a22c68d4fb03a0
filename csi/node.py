"""CSI Node service: stage, publish and measure volumes on this node."""

from __future__ import annotations

import logging

from control import mirrored
from control.frontend_backend import FrontendBackend, FrontendVolume
from csi import validation
from csi.config import TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY, Config
from csi.errors import translated
from engine.errors import InvalidSpec, NotFound, Precondition
from engine.node_engine import NodeEngine
from engine.node_volumes import BLOCK, PublishRequest, StageRequest
from proto import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)

NodeCap = csi_pb2.NodeServiceCapability.RPC
CAPABILITIES = (
    NodeCap.STAGE_UNSTAGE_VOLUME,
    NodeCap.GET_VOLUME_STATS,
    NodeCap.EXPAND_VOLUME,
    NodeCap.VOLUME_CONDITION,
    NodeCap.SINGLE_NODE_MULTI_WRITER,
)
POD_UID_KEY = "csi.storage.k8s.io/pod.uid"


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, config: Config, engine: NodeEngine,
                 frontends: FrontendBackend | None = None):
        """frontends: mirrored volumes' frontends (cluster nodes); None: none here."""
        self.config = config
        self.engine = engine
        self.frontends = frontends
        if frontends is not None:
            engine.serve_frontends(frontends)
        self.locks = engine.locks  # the node's one table: the controller's calls use it too
        self.paths = validation.PathPolicy.of(
            config.allowed_path_roots,
            (config.state_dir, config.pool_directory, config.socket_path))

    def _known(self, volume_id: str) -> bool:
        return validation.well_formed_id(volume_id) \
            and self.engine.volumes.files.get(volume_id) is not None

    def _mirrored(self, req) -> None:
        """A mirrored volume: what ControllerPublish decided (publish_context) is recorded
        before the stage, which then gets the volume's device from its frontend."""
        if req.volume_context.get(mirrored.MIRRORED_KEY) != "true":
            return
        if self.frontends is None:
            raise Precondition(f"node {self.config.node_id} runs no mirror frontends (start "
                               "it with --mirror-key in cluster mode)")
        ctx = req.publish_context
        try:
            volume = FrontendVolume(
                volume_id=req.volume_id, size_bytes=int(ctx[mirrored.SIZE_KEY]),
                replicas=tuple(r for r in ctx[mirrored.REPLICAS_KEY].split(",") if r),
                generation=int(ctx[mirrored.GENERATION_KEY]),
                min_in_sync=int(req.volume_context.get(mirrored.MIN_IN_SYNC_KEY, "1")),
                access_types=(validation.access_type(req.volume_capability),))
        except (KeyError, ValueError) as e:
            raise InvalidSpec(f"publish_context of mirrored volume {req.volume_id} lacks "
                              f"what ControllerPublish gives ({e}): attach it first") from None
        self.frontends.prepare(volume, ctx.get(mirrored.QOS_KEY, ""),
                               int(ctx.get(mirrored.QOS_VERSION_KEY, "0") or 0))

    def _require_volume(self, volume_id: str) -> None:
        if not self._known(volume_id):
            raise NotFound(f"volume {volume_id!r} does not exist on node {self.config.node_id}")

    def _path(self, value: str, what: str) -> str:
        return validation.check_path(value, what, self.paths)

    def _unknown_volume_gone(self, volume_id: str, path: str) -> None:
        """Unpublish/unstage of a volume this node does not know (deleted, failed over, a
        reboot's leftovers): done, as the kubelet expects, unless something is mounted at
        the path, which is then someone else's to take off (NOT_FOUND, nothing touched)."""
        if self.engine.is_mounted(path):
            raise NotFound(f"volume {volume_id!r} does not exist on node "
                            f"{self.config.node_id}, and {path} holds another mount")

    @translated
    def NodeStageVolume(self, req, context):
        volume_id = validation.require(req.volume_id, "volume_id")
        staging = self._path(req.staging_target_path, "staging_target_path")
        if not req.HasField("volume_capability"):
            raise InvalidSpec("volume_capability is required")
        cap = req.volume_capability
        kind = validation.check_capability(cap)
        with self.locks.hold(volume_id):
            self._mirrored(req)
            self._require_volume(volume_id)
            self.engine.volumes.stage(StageRequest(
                volume_id=volume_id,
                staging_path=staging,
                access_type=kind,
                fs_type=cap.mount.fs_type if kind != BLOCK else "",
                mount_flags=tuple(cap.mount.mount_flags) if kind != BLOCK else (),
                read_only=cap.access_mode.mode in validation.READER_ONLY_MODES,
            ))
        return csi_pb2.NodeStageVolumeResponse()

    @translated
    def NodeUnstageVolume(self, req, context):
        volume_id = validation.require(req.volume_id, "volume_id")
        staging = self._path(req.staging_target_path, "staging_target_path")
        with self.locks.hold(volume_id):
            if not self._known(volume_id):
                self._unknown_volume_gone(volume_id, staging)
                return csi_pb2.NodeUnstageVolumeResponse()
            self.engine.volumes.unstage(volume_id, staging)
            if self.frontends is not None:  # a mirrored volume's record goes with its stage
                self.frontends.forget(volume_id)
        return csi_pb2.NodeUnstageVolumeResponse()

    @translated
    def NodePublishVolume(self, req, context):
        volume_id = validation.require(req.volume_id, "volume_id")
        target = self._path(req.target_path, "target_path")
        if not req.HasField("volume_capability"):
            raise InvalidSpec("volume_capability is required")
        if not req.staging_target_path:
            # the spec's code: STAGE_UNSTAGE_VOLUME is advertised, so staging comes first
            raise Precondition("staging_target_path is not set")
        staging = self._path(req.staging_target_path, "staging_target_path")
        cap = req.volume_capability
        kind = validation.check_capability(cap)
        with self.locks.hold(volume_id):
            self._require_volume(volume_id)
            self.engine.publish(PublishRequest(
                volume_id=volume_id,
                staging_path=staging,
                target_path=target,
                access_type=kind,
                read_only=req.readonly or cap.access_mode.mode in validation.READER_ONLY_MODES,
                mount_flags=tuple(cap.mount.mount_flags) if kind != BLOCK else (),
                single_writer=cap.access_mode.mode == validation.Mode.SINGLE_NODE_SINGLE_WRITER,
                pod_uid=req.volume_context.get(POD_UID_KEY, ""),
            ))
        return csi_pb2.NodePublishVolumeResponse()

    @translated
    def NodeUnpublishVolume(self, req, context):
        volume_id = validation.require(req.volume_id, "volume_id")
        target = self._path(req.target_path, "target_path")
        with self.locks.hold(volume_id):
            if not self._known(volume_id):
                self._unknown_volume_gone(volume_id, target)
                return csi_pb2.NodeUnpublishVolumeResponse()
            self.engine.unpublish(volume_id, target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    @translated
    def NodeGetVolumeStats(self, req, context):
        volume_id = validation.require(req.volume_id, "volume_id")
        path = validation.require(req.volume_path, "volume_path")
        self._require_volume(volume_id)
        stats = self.engine.volumes.stats(volume_id, path)
        u = stats.usage
        usage = [csi_pb2.VolumeUsage(unit=csi_pb2.VolumeUsage.BYTES, total=u.total_bytes,
                                     available=u.available_bytes, used=u.used_bytes)]
        if not stats.block:
            usage.append(csi_pb2.VolumeUsage(unit=csi_pb2.VolumeUsage.INODES,
                                             total=u.total_inodes, available=u.free_inodes,
                                             used=u.used_inodes))
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=usage,
            volume_condition=csi_pb2.VolumeCondition(abnormal=stats.abnormal,
                                                     message=stats.message),
        )

    @translated
    def NodeExpandVolume(self, req, context):
        volume_id = validation.require(req.volume_id, "volume_id")
        path = validation.require(req.volume_path, "volume_path")
        if req.HasField("volume_capability"):
            validation.check_capability(req.volume_capability)
        with self.locks.hold(volume_id):
            self._require_volume(volume_id)
            size = self.engine.volumes.expand(volume_id, path)
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    @translated
    def NodeGetCapabilities(self, req, context):
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=csi_pb2.NodeServiceCapability.RPC(type=c))
            for c in CAPABILITIES
        ])

    @translated
    def NodeGetInfo(self, req, context):
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.config.node_id,
            max_volumes_per_node=self.config.max_volumes_per_node,
            accessible_topology=csi_pb2.Topology(segments={
                TOPOLOGY_NODE_KEY: self.config.node_id,
                TOPOLOGY_ZONE_KEY: self.config.zone,
            }),
        )
