"""A CSI controller that does nothing, served the way Tandem serves: the Python floor.

tests/bench/control.py measures it beside Tandem and hostpath with the same client: the
pairs/s a Python gRPC server (grpcio, the same executor as the driver) reaches when the
handlers themselves cost nothing. Tandem cannot be faster than this in Python; the gap
between the two is Tandem's own work (records, commits, files), the gap to hostpath is
the language and its gRPC layer.

    python -m tests.bench.noop_csi --endpoint unix:///path/noop.sock
"""

from __future__ import annotations

import argparse
import uuid

import grpc

from control.warm_pool import WarmPool
from proto import csi_pb2, csi_pb2_grpc


class NoopController(csi_pb2_grpc.ControllerServicer):
    def CreateVolume(self, request, context):
        return csi_pb2.CreateVolumeResponse(volume=csi_pb2.Volume(
            volume_id=f"noop-{uuid.uuid4().hex}",
            capacity_bytes=request.capacity_range.required_bytes))

    def DeleteVolume(self, request, context):
        return csi_pb2.DeleteVolumeResponse()


class NoopIdentity(csi_pb2_grpc.IdentityServicer):
    def Probe(self, request, context):
        return csi_pb2.ProbeResponse()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--workers", type=int, default=16)  # the driver's default
    args = ap.parse_args()
    server = grpc.server(WarmPool(max_workers=args.workers, name="noop"))
    csi_pb2_grpc.add_ControllerServicer_to_server(NoopController(), server)
    csi_pb2_grpc.add_IdentityServicer_to_server(NoopIdentity(), server)
    server.add_insecure_port(args.endpoint)
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
