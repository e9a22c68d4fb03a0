"""CSI GroupController service: snapshots of several volumes at one instant."""

from __future__ import annotations

from csi.errors import translated
from csi.snapshotter import Snapshotter
from proto import csi_pb2, csi_pb2_grpc

GroupCap = csi_pb2.GroupControllerServiceCapability.RPC


class GroupControllerService(csi_pb2_grpc.GroupControllerServicer):
    def __init__(self, snapshotter: Snapshotter):
        self.snapshotter = snapshotter

    @translated
    def GroupControllerGetCapabilities(self, req, context):
        cap = csi_pb2.GroupControllerServiceCapability(
            rpc=GroupCap(type=GroupCap.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT))
        return csi_pb2.GroupControllerGetCapabilitiesResponse(capabilities=[cap])

    @translated
    def CreateVolumeGroupSnapshot(self, req, context):
        return self.snapshotter.create_group(req)

    @translated
    def DeleteVolumeGroupSnapshot(self, req, context):
        return self.snapshotter.delete_group(req)

    @translated
    def GetVolumeGroupSnapshot(self, req, context):
        return self.snapshotter.get_group(req)
