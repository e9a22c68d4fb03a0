"""The node API of a remote node: a client of its agent (control/agent_server.py).

A NodeApi like LocalNode, so the controller's code cannot tell them apart: the same
arguments, results and domain errors. Each call has a deadline (short for reads, longer
for calls that make or remove storage); a status from the agent becomes the domain error
it was raised as (control/grpc_errors.error_for); a node that cannot be reached or does
not answer in time (UNAVAILABLE, DEADLINE_EXCEEDED) is `Unavailable`, naming the node. A
call that timed out may still complete on the node: every call is idempotent, and the
controller's records (intent first) make a retry safe.

    client = AgentClient("node-1", "198.18.0.11:7600", ReloadingTls(files))
    client.create_volume(NewVolume(...))
"""

from __future__ import annotations

import threading
from typing import Any

import grpc

from control import agent_codec
from control.agent_tls import DEFAULT_SERVER_NAME, ReloadingTls
from control.grpc_errors import error_for, error_kind
from control.node_api import (
    BackupJob,
    ByteRange,
    FrontendBarrier,
    HeldReplica,
    Inventory,
    JobStatus,
    NewReplica,
    NewVolume,
    NodeInfo,
    ReplicaInfo,
    RestoreJob,
    SnapshotInfo,
    SnapshotMember,
    VolumeInfo,
)
from engine import waits
from engine.errors import Unavailable
from engine.qos.tiers import QosSpec
from proto import agent_pb2_grpc

READ_TIMEOUT_S = 10.0  # info, lookups: a node that takes longer is as good as away
WRITE_TIMEOUT_S = 60.0  # making, cloning, removing, snapshotting storage
READS = frozenset({"info", "volume", "volumes", "snapshot", "replica", "backup_status",
                   "restore_status"})

_CHANNEL_OPTIONS = [
    # a node back from a restart or a cut is used again within a second or two; a
    # connection (TCP and TLS handshake) gets 2 s, so a silent node fails calls in 2 s
    # rather than at their deadline, and a loaded one still gets through
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 2000),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # notice a silent peer (a cut link) instead of waiting on a dead connection
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.use_local_subchannel_pool", 1),
]


class AgentClient:
    def __init__(self, node_id: str, address: str, tls: ReloadingTls, *,
                 server_name: str = DEFAULT_SERVER_NAME,
                 read_timeout_s: float = READ_TIMEOUT_S,
                 write_timeout_s: float = WRITE_TIMEOUT_S):
        self._node_id = node_id
        self.address = address
        self.tls = tls
        self.server_name = server_name
        self.read_timeout_s = read_timeout_s
        self.write_timeout_s = write_timeout_s
        self._lock = threading.Lock()
        self._generation = -1
        self._channel: grpc.Channel | None = None
        self._stub: Any = None
        self._closed = False

    @property
    def node_id(self) -> str:
        return self._node_id

    def _current_stub(self) -> Any:
        """The stub on a channel with the current certificates (a new channel after a
        rotation; calls in flight on the old one finish first)."""
        with self._lock:
            if self._closed:
                raise Unavailable(f"node {self._node_id}: the client is closed")
            generation, pem = self.tls.current()
            if generation != self._generation or self._channel is None:
                old = self._channel
                options = [*_CHANNEL_OPTIONS,
                           ("grpc.ssl_target_name_override", self.server_name)]
                self._channel = grpc.secure_channel(
                    self.address, self.tls.channel_credentials(pem), options=options)
                self._stub = agent_pb2_grpc.NodeAgentStub(self._channel)
                self._generation = generation
                if old is not None:
                    closer = threading.Timer(self.write_timeout_s, old.close)
                    closer.daemon = True
                    closer.start()
            return self._stub

    def _call(self, method: str, **args: Any) -> Any:
        rpc = getattr(self._current_stub(), agent_codec.rpc_name(method))
        timeout = self.read_timeout_s if method in READS else self.write_timeout_s
        try:
            with waits.io_wait():  # the node's round trip: lend this thread's place
                reply = rpc(agent_codec.encode_call(method, args), timeout=timeout)
        except grpc.RpcError as e:
            raise self._error(method, e) from None
        return agent_codec.decode_result(method, reply)

    def _error(self, method: str, e: grpc.RpcError) -> Exception:
        code, details = e.code(), e.details() or ""
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.CANCELLED):  # CANCELLED: the channel was closed
            kind = error_kind(e.trailing_metadata())
            if not kind:  # the transport's, not the node's own answer
                return Unavailable(f"node {self._node_id} ({self.address}) did not answer "
                                   f"{method}: {code.name}: {details}")
        return error_for(code, details, error_kind(e.trailing_metadata()))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    # --- the node API (control/node_api.py) -----------------------------------------------
    def info(self) -> NodeInfo:
        return self._call("info")

    def create_volume(self, spec: NewVolume) -> VolumeInfo:
        return self._call("create_volume", spec=spec)

    def delete_volume(self, volume_id: str, version: int) -> None:
        self._call("delete_volume", volume_id=volume_id, version=version)

    def expand_volume(self, volume_id: str, size_bytes: int, version: int) -> VolumeInfo:
        return self._call("expand_volume", volume_id=volume_id, size_bytes=size_bytes,
                          version=version)

    def set_qos(self, volume_id: str, qos: QosSpec, version: int) -> None:
        self._call("set_qos", volume_id=volume_id, qos=qos, version=version)

    def volume(self, volume_id: str) -> VolumeInfo | None:
        return self._call("volume", volume_id=volume_id)

    def volumes(self, volume_ids: tuple[str, ...]) -> tuple[VolumeInfo, ...]:
        return self._call("volumes", volume_ids=volume_ids)

    def inventory(self) -> Inventory:
        return self._call("inventory")

    def create_snapshots(self, members: tuple[SnapshotMember, ...]) -> tuple[SnapshotInfo, ...]:
        return self._call("create_snapshots", members=members)

    def delete_snapshot(self, snapshot_id: str) -> None:
        self._call("delete_snapshot", snapshot_id=snapshot_id)

    def snapshot(self, snapshot_id: str) -> SnapshotInfo | None:
        return self._call("snapshot", snapshot_id=snapshot_id)

    def allocated_ranges(self, snapshot_id: str) -> tuple[ByteRange, ...]:
        return self._call("allocated_ranges", snapshot_id=snapshot_id)

    def changed_ranges(self, base_snapshot_id: str,
                       target_snapshot_id: str) -> tuple[ByteRange, ...]:
        return self._call("changed_ranges", base_snapshot_id=base_snapshot_id,
                          target_snapshot_id=target_snapshot_id)

    def create_replica(self, spec: NewReplica) -> ReplicaInfo:
        return self._call("create_replica", spec=spec)

    def delete_replica(self, volume_id: str, version: int) -> None:
        self._call("delete_replica", volume_id=volume_id, version=version)

    def fence_replica(self, volume_id: str, generation: int) -> int:
        return self._call("fence_replica", volume_id=volume_id, generation=generation)

    def set_frontend_replicas(self, volume_id: str, replicas: tuple[str, ...]) -> bool:
        return self._call("set_frontend_replicas", volume_id=volume_id, replicas=replicas)

    def replica(self, volume_id: str) -> HeldReplica | None:
        return self._call("replica", volume_id=volume_id)

    def expand_replica(self, volume_id: str, size_bytes: int, version: int) -> HeldReplica:
        return self._call("expand_replica", volume_id=volume_id, size_bytes=size_bytes,
                          version=version)

    def snapshot_replica(self, snapshot_id: str, volume_id: str) -> SnapshotInfo:
        return self._call("snapshot_replica", snapshot_id=snapshot_id, volume_id=volume_id)

    def barrier_frontend(self, volume_id: str, token: str, hold_s: float) -> FrontendBarrier:
        return self._call("barrier_frontend", volume_id=volume_id, token=token, hold_s=hold_s)

    def resume_frontend(self, volume_id: str, token: str) -> bool:
        return self._call("resume_frontend", volume_id=volume_id, token=token)

    def set_frontend_qos(self, volume_id: str, qos: QosSpec, version: int) -> None:
        self._call("set_frontend_qos", volume_id=volume_id, qos=qos, version=version)

    def start_backup(self, job: BackupJob) -> JobStatus:
        return self._call("start_backup", job=job)

    def backup_status(self, snapshot_id: str) -> JobStatus | None:
        return self._call("backup_status", snapshot_id=snapshot_id)

    def start_restore(self, job: RestoreJob) -> JobStatus:
        return self._call("start_restore", job=job)

    def restore_status(self, volume_id: str) -> JobStatus | None:
        return self._call("restore_status", volume_id=volume_id)

    def __repr__(self) -> str:
        return f"AgentClient({self._node_id!r}, {self.address!r})"
