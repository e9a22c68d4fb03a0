"""CSI Identity service: who we are, what we offer, whether we are ready."""

from __future__ import annotations

import threading
from importlib import metadata

from csi.config import DRIVER_NAME
from csi.errors import translated
from proto import csi_pb2, csi_pb2_grpc

PluginCap = csi_pb2.PluginCapability


def driver_version() -> str:
    try:
        return metadata.version("tandem-csi")
    except metadata.PackageNotFoundError:
        return "0.0.0+source"


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, ready: threading.Event):
        self.ready = ready

    @translated
    def GetPluginInfo(self, req, context):
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=driver_version())

    @translated
    def GetPluginCapabilities(self, req, context):
        caps = [
            PluginCap(service=PluginCap.Service(type=PluginCap.Service.CONTROLLER_SERVICE)),
            PluginCap(service=PluginCap.Service(
                type=PluginCap.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
            PluginCap(service=PluginCap.Service(type=PluginCap.Service.GROUP_CONTROLLER_SERVICE)),
            PluginCap(service=PluginCap.Service(
                type=PluginCap.Service.SNAPSHOT_METADATA_SERVICE)),
            PluginCap(volume_expansion=PluginCap.VolumeExpansion(
                type=PluginCap.VolumeExpansion.ONLINE)),
        ]
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    @translated
    def Probe(self, req, context):
        # Always OK: readiness is an answer, not an error.
        return csi_pb2.ProbeResponse(ready={"value": self.ready.is_set()})
