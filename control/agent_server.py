"""The node agent API's server: a node's NodeApi (its LocalNode) for the controllers, over
TCP with mutual TLS (control/agent_tls.py).

Every RPC is one line: decode the request into the NodeApi method's arguments, call it,
encode what it returned (control/agent_codec.py). Domain errors go through the one
translator (control/grpc_errors.translated), which also names the error's class in the
status's trailing metadata so the client raises the same class again.

    server = AgentServer(LocalNode(engine, 128), "198.18.0.11:7600", ReloadingTls(files))
    server.start(); ...; server.stop()
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from control import agent_codec
from control.agent_tls import ReloadingTls
from control.grpc_errors import translated
from control.node_api import NodeApi
from control.warm_pool import WarmPool
from proto import agent_pb2_grpc

log = logging.getLogger(__name__)


class AgentService(agent_pb2_grpc.NodeAgentServicer):
    def __init__(self, node: NodeApi):
        self.node = node

    def _serve(self, method: str, request: Any) -> Any:
        args = agent_codec.decode_call(method, request)
        return agent_codec.encode_result(method, getattr(self.node, method)(**args))

    @translated
    def Info(self, request, context):
        return self._serve("info", request)

    @translated
    def CreateVolume(self, request, context):
        return self._serve("create_volume", request)

    @translated
    def DeleteVolume(self, request, context):
        return self._serve("delete_volume", request)

    @translated
    def ExpandVolume(self, request, context):
        return self._serve("expand_volume", request)

    @translated
    def SetQos(self, request, context):
        return self._serve("set_qos", request)

    @translated
    def Volume(self, request, context):
        return self._serve("volume", request)

    @translated
    def Volumes(self, request, context):
        return self._serve("volumes", request)

    @translated
    def Inventory(self, request, context):
        return self._serve("inventory", request)

    @translated
    def CreateSnapshots(self, request, context):
        return self._serve("create_snapshots", request)

    @translated
    def DeleteSnapshot(self, request, context):
        return self._serve("delete_snapshot", request)

    @translated
    def Snapshot(self, request, context):
        return self._serve("snapshot", request)

    @translated
    def AllocatedRanges(self, request, context):
        return self._serve("allocated_ranges", request)

    @translated
    def ChangedRanges(self, request, context):
        return self._serve("changed_ranges", request)

    @translated
    def CreateReplica(self, request, context):
        return self._serve("create_replica", request)

    @translated
    def DeleteReplica(self, request, context):
        return self._serve("delete_replica", request)

    @translated
    def FenceReplica(self, request, context):
        return self._serve("fence_replica", request)

    @translated
    def SetFrontendReplicas(self, request, context):
        return self._serve("set_frontend_replicas", request)

    @translated
    def Replica(self, request, context):
        return self._serve("replica", request)

    @translated
    def ExpandReplica(self, request, context):
        return self._serve("expand_replica", request)

    @translated
    def SnapshotReplica(self, request, context):
        return self._serve("snapshot_replica", request)

    @translated
    def BarrierFrontend(self, request, context):
        return self._serve("barrier_frontend", request)

    @translated
    def ResumeFrontend(self, request, context):
        return self._serve("resume_frontend", request)

    @translated
    def SetFrontendQos(self, request, context):
        return self._serve("set_frontend_qos", request)

    @translated
    def StartBackup(self, request, context):
        return self._serve("start_backup", request)

    @translated
    def BackupStatus(self, request, context):
        return self._serve("backup_status", request)

    @translated
    def StartRestore(self, request, context):
        return self._serve("start_restore", request)

    @translated
    def RestoreStatus(self, request, context):
        return self._serve("restore_status", request)


class AgentServer:
    """Serves one NodeApi on `listen` ("HOST:PORT"; port 0 picks one: see `port`)."""

    def __init__(self, node: NodeApi, listen: str, tls: ReloadingTls, workers: int = 16):
        self.node = node
        self.listen = listen
        self.tls = tls
        self.server = grpc.server(
            WarmPool(max_workers=workers, name="agent"),
            options=[("grpc.max_receive_message_length", 16 * 1024 * 1024),
                     # notice controllers that vanished (a cut link) and free their calls
                     ("grpc.keepalive_time_ms", 10_000),
                     ("grpc.keepalive_timeout_ms", 5_000),
                     ("grpc.http2.min_ping_interval_without_data_ms", 5_000)])
        agent_pb2_grpc.add_NodeAgentServicer_to_server(AgentService(node), self.server)
        self.port = self.server.add_secure_port(listen, tls.server_credentials())
        if self.port == 0:
            raise OSError(f"cannot listen on {listen} for the node agent API")

    def start(self) -> None:
        self.server.start()
        log.info("node agent API of %s on %s (mutual TLS)", self.node.node_id, self.address)

    @property
    def address(self) -> str:
        host = self.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    def stop(self, grace_s: float = 5.0) -> None:
        self.server.stop(grace_s).wait()
