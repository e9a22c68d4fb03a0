"""The agent's messages mirror the node API exactly, so conversion can be generic: every
NodeApi method has its RPC, request and reply, every dataclass its message, and values
survive the round trip unchanged."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
from google.protobuf.descriptor import FieldDescriptor

from control import agent_codec, node_api
from control.agent_client import AgentClient
from control.agent_server import AgentService
from control.node_api import (
    BackupJob,
    ByteRange,
    Condition,
    Inventory,
    JobStatus,
    NewVolume,
    NodeInfo,
    RestoreJob,
    SnapshotInfo,
    SnapshotMember,
    VolumeInfo,
    VolumeSource,
)
from engine.backup.targets import Credentials, ObjectStore, Target
from engine.qos.tiers import QosSpec
from proto import agent_pb2

METHODS = sorted(name for name, member in inspect.getmembers(node_api.NodeApi)
                 if inspect.isfunction(member) and not name.startswith("_"))
DATACLASSES = [Condition, NodeInfo, VolumeSource, NewVolume, VolumeInfo, SnapshotMember,
               SnapshotInfo, ByteRange, Inventory, QosSpec, Credentials, Target, ObjectStore,
               BackupJob, RestoreJob, JobStatus]
SCALARS = {int: FieldDescriptor.TYPE_INT64, float: FieldDescriptor.TYPE_DOUBLE,
           str: FieldDescriptor.TYPE_STRING, bool: FieldDescriptor.TYPE_BOOL}


def _is_repeated(field) -> bool:
    # protobuf 7 dropped .label; is_repeated is the property since 5.x
    return bool(getattr(field, "is_repeated", None)) or \
        getattr(field, "label", None) == FieldDescriptor.LABEL_REPEATED


def check_field(field, hint, where: str) -> None:
    inner = agent_codec._optional(hint)
    if inner is not None:
        assert field.message_type is not None, f"{where}: an optional result must be a message"
        hint = inner
    if typing.get_origin(hint) is tuple:
        assert _is_repeated(field), f"{where}: a tuple is a repeated field"
        (hint,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
    else:
        assert not _is_repeated(field), f"{where}: repeated, but not a tuple"
    if dataclasses.is_dataclass(hint):
        assert field.message_type is not None and field.message_type.name == hint.__name__, \
            f"{where}: expected message {hint.__name__}"
    else:
        assert field.type == SCALARS[hint], f"{where}: {hint} is not {field.type}"


def test_the_node_api_methods_are_found():
    """The Protocol's methods are read from it (so a new one is checked at once)."""
    first_ones = {"info", "create_volume", "delete_volume", "expand_volume", "set_qos",
                  "volume", "volumes", "inventory", "create_snapshots", "delete_snapshot",
                  "snapshot", "allocated_ranges", "changed_ranges"}
    assert first_ones <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_has_its_rpc_request_and_reply(method):
    rpc = agent_codec.rpc_name(method)
    service = agent_pb2.DESCRIPTOR.services_by_name["NodeAgent"]
    assert rpc in service.methods_by_name, f"proto/agent.proto lacks rpc {rpc}"
    desc = service.methods_by_name[rpc]
    assert desc.input_type.name == f"{rpc}Request"
    assert desc.output_type.name == f"{rpc}Reply"
    hints = agent_codec.signature(method)
    params = [n for n in hints if n != "return"]
    assert [f.name for f in desc.input_type.fields] == params
    for name in params:
        check_field(desc.input_type.fields_by_name[name], hints[name], f"{rpc}Request.{name}")
    if hints["return"] is type(None):
        assert not desc.output_type.fields, f"{rpc}Reply: the method returns nothing"
    else:
        assert [f.name for f in desc.output_type.fields] == ["result"]
        check_field(desc.output_type.fields_by_name["result"], hints["return"],
                    f"{rpc}Reply.result")
    # both ends implement it, the server's errors through the one translator
    assert callable(getattr(AgentService, rpc, None)), f"AgentService.{rpc} is missing"
    assert getattr(getattr(AgentService, rpc), "__wrapped__", None) is not None, \
        f"AgentService.{rpc} is not @translated: its domain errors would come back UNKNOWN"
    assert callable(getattr(AgentClient, method, None)), f"AgentClient.{method} is missing"
    assert list(inspect.signature(getattr(AgentClient, method)).parameters)[1:] == params


def test_every_rpc_is_a_node_api_method():
    service = agent_pb2.DESCRIPTOR.services_by_name["NodeAgent"]
    assert sorted(service.methods_by_name) == sorted(agent_codec.rpc_name(m) for m in METHODS)


@pytest.mark.parametrize("cls", DATACLASSES, ids=lambda c: c.__name__)
def test_every_dataclass_has_its_mirror_message(cls):
    message = agent_pb2.DESCRIPTOR.message_types_by_name[cls.__name__]
    names = [f.name for f in dataclasses.fields(cls)]
    assert [f.name for f in message.fields] == names, "same fields, same order"
    assert [f.number for f in message.fields] == list(range(1, len(names) + 1))
    hints = typing.get_type_hints(cls)
    for name in names:
        check_field(message.fields_by_name[name], hints[name], f"{cls.__name__}.{name}")


QOS = QosSpec("gold", 1, 2, 3, 4, 5, 6)
VOLUME = VolumeInfo("vol-a", 1 << 40, ("block", "mount"), QOS, 1700000000.25, True,
                    Condition(True, "pool nearly full"), 12345678901)
VALUES = [
    NodeInfo("n1", "z1", 10 << 40, 5 << 40, 1 << 30, 9000, 64, Condition(True, "orphans")),
    NewVolume("vol-a", 1 << 30, ("mount",), QOS, VolumeSource("snapshot", "snap-b"), 7),
    VOLUME,
    Inventory((VOLUME, VOLUME), (SnapshotInfo("snap-a", "vol-a", 1 << 30, 1.5),),
              ("deadbeef",)),
    Inventory(),
    ByteRange(1 << 41, 4096),
]
STORE = ObjectStore(
    Target("offsite", "https://s3.example.net:8443", "backups", "cluster-a/", "eu-west-1",
           "/etc/tandem/backup/ca.pem", ""),
    Credentials("AKIAEXAMPLE", "secret/with+chars=", "k" * 44, "session-token"))
BACKUP = BackupJob("bkp:offsite:" + "a" * 32, "a" * 32, STORE, "bkp:offsite:" + "b" * 32,
                   "b" * 32)
VALUES += [STORE, BACKUP, RestoreJob("vol-a", "a" * 32, STORE),
           JobStatus("failed", 1 << 40, 1 << 39, 12345, "blob x is damaged", "DataLoss")]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_values_round_trip(value):
    message = agent_codec.to_message(value)
    wire = type(message).FromString(message.SerializeToString())
    assert agent_codec.from_message(wire, type(value)) == value


@pytest.mark.parametrize("method, args, result", [
    ("info", {}, VALUES[0]),
    ("create_volume", {"spec": VALUES[1]}, VOLUME),
    ("delete_volume", {"volume_id": "vol-a", "version": 3}, None),
    ("set_qos", {"volume_id": "vol-a", "qos": QOS, "version": 4}, None),
    ("volume", {"volume_id": "vol-a"}, VOLUME),
    ("volume", {"volume_id": "vol-a"}, None),  # not held: absent, not an empty VolumeInfo
    ("volumes", {"volume_ids": ("vol-a", "vol-b")}, (VOLUME,)),
    ("volumes", {"volume_ids": ()}, ()),
    ("create_snapshots", {"members": (SnapshotMember("s1", "v1"), SnapshotMember("s2", "v2"))},
     (SnapshotInfo("s1", "v1", 5, 2.0), SnapshotInfo("s2", "v2", 6, 2.0))),
    ("snapshot", {"snapshot_id": "s1"}, None),
    ("changed_ranges", {"base_snapshot_id": "a", "target_snapshot_id": "b"},
     (ByteRange(0, 4096), ByteRange(8192, 4096))),
    ("start_backup", {"job": BACKUP}, JobStatus("running")),
    ("backup_status", {"snapshot_id": BACKUP.snapshot_id}, None),
    ("start_restore", {"job": VALUES[-2]}, JobStatus("done", 5, 5)),
    ("restore_status", {"volume_id": "vol-a"}, VALUES[-1]),
])
def test_calls_round_trip(method, args, result):
    request = agent_codec.encode_call(method, args)
    request = type(request).FromString(request.SerializeToString())
    assert agent_codec.decode_call(method, request) == args
    reply = agent_codec.encode_result(method, result)
    reply = type(reply).FromString(reply.SerializeToString())
    assert agent_codec.decode_result(method, reply) == result
