"""CreateVolume's "is this a retry?" rule on records (control/idempotency.py), no driver."""

from __future__ import annotations

from control.idempotency import CreateAsk, incompatibility
from control.records import READY, VolumeRecord
from csi.idempotency import capability_key
from proto import csi_pb2

MIB = 1024 * 1024
MOUNT_SNW = ("mount", "SINGLE_NODE_WRITER", "ext4")


def ask(**kw) -> CreateAsk:
    base = dict(parameters={"tier": "gold"}, mutable_parameters={},
                capabilities=frozenset({MOUNT_SNW}), required_bytes=64 * MIB, limit_bytes=0,
                source_kind="", source_id="")
    return CreateAsk(**{**base, **kw})


def record(**kw) -> VolumeRecord:
    base = dict(volume_id="vol-" + "1" * 32, name="v", request_hash="h", state=READY,
                capacity_bytes=64 * MIB, node_id="n1",
                zone="z1", access_types=("mount",), parameters={"tier": "gold"},
                mutable_parameters={}, capabilities=(MOUNT_SNW,),
                created_mutable_parameters={}, created_bytes=64 * MIB)
    return VolumeRecord(**{**base, **kw})


def test_capability_key_normalises_the_default_filesystem() -> None:
    Mode = csi_pb2.VolumeCapability.AccessMode
    cap = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="", mount_flags=["noatime"]),
        access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))
    assert capability_key(cap) == MOUNT_SNW
    block = csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                     access_mode=Mode(mode=Mode.SINGLE_NODE_READER_ONLY))
    assert capability_key(block) == ("block", "SINGLE_NODE_READER_ONLY", "")


def test_the_record_round_trips_what_was_asked() -> None:
    vol = record(capabilities=(MOUNT_SNW, ("block", "SINGLE_NODE_WRITER", "")))
    assert VolumeRecord.from_value(vol.to_value()) == vol


def test_current_mutable_parameters_do_not_count_the_creation_ones_do() -> None:
    modified = record(mutable_parameters={"tier": "silver"})  # ModifyVolume since creation
    assert incompatibility(modified, ask()) == ""
    assert "mutable" in incompatibility(modified, ask(mutable_parameters={"tier": "silver"}))


def test_either_the_size_now_or_the_size_made_satisfies_the_range() -> None:
    grown = record(capacity_bytes=128 * MIB)
    assert incompatibility(grown, ask(limit_bytes=64 * MIB)) == ""
    assert incompatibility(grown, ask(required_bytes=128 * MIB)) == ""
    assert "range" in incompatibility(grown, ask(required_bytes=96 * MIB,
                                                 limit_bytes=96 * MIB))


def test_requisite_topology_must_hold_the_volume_preferred_is_not_asked() -> None:
    assert incompatibility(record(), ask(requisite=({"topology.tandem.csi.dev/zone": "z1"},))) == ""
    assert "topology" in incompatibility(
        record(), ask(requisite=({"topology.tandem.csi.dev/zone": "z2"},)))
