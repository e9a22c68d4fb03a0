"""Expansion: ControllerExpand answers exactly the size asked and says the node must act;
NodeExpand (without a volume_capability) grows the device and the filesystem, for block
volumes too; a volume expanded before staging is staged at its current size."""

from __future__ import annotations

import os

import grpc
import pytest

from proto import csi_pb2
from tests.conformance.helpers import (
    GIB,
    MIB,
    SMALL,
    XFS_SMALL,
    block_device_size,
    capability,
    fs_size,
    loops_under,
    ok,
)

BIGGER = 2 * SMALL


def controller_expand(co, volume_id: str, size: int, access_type: str = "mount"):
    rsp = ok(co.stubs.controller.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capability=capability(access_type)))
    assert rsp.capacity_bytes == size
    assert rsp.node_expansion_required
    got = ok(co.stubs.controller.ControllerGetVolume,
             csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id))
    assert got.volume.capacity_bytes == size
    return rsp


def node_expand(co, volume_id: str, path: str, size: int) -> None:
    # As csi-sanity and kubelet send it: no volume_capability.
    rsp = ok(co.stubs.node.NodeExpandVolume, csi_pb2.NodeExpandVolumeRequest(
        volume_id=volume_id, volume_path=path,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size)))
    assert rsp.capacity_bytes in (0, size)


def has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        eff = next(line for line in f if line.startswith("CapEff:"))
    return bool(int(eff.split()[1], 16) >> 24 & 1)  # CAP_SYS_RESOURCE


def online_layout(access_type: str) -> tuple[str, int, int]:
    """(fs_type, size, grown size) for online growth. ext4 grows online only with
    CAP_SYS_RESOURCE (test_ext4_online_expansion covers it where the kernel allows);
    xfs_growfs needs CAP_SYS_ADMIN only, so the mount-mode cases use xfs."""
    if access_type == "block":
        return "ext4", SMALL, BIGGER
    return "xfs", XFS_SMALL, XFS_SMALL + 100 * MIB


def visible_size(access_type: str, target: str) -> int:
    return block_device_size(target) if access_type == "block" else fs_size(target)


def assert_size(access_type: str, target: str, size: int) -> None:
    got = visible_size(access_type, target)
    if access_type == "block":
        assert got == size
    else:  # statvfs leaves out the filesystem's own metadata (journal, inode tables)
        assert 0.75 * size < got <= size, (got, size)


def test_controller_expand_answers_exactly(co, access_type):
    vol = co.create(access_type=access_type)
    controller_expand(co, vol.volume_id, BIGGER, access_type)
    controller_expand(co, vol.volume_id, BIGGER, access_type)  # again: same answer


def test_controller_expand_10_to_11_gib(co):
    """csi-sanity's numbers, exactly (sparse: no data is written)."""
    vol = co.create(size=10 * GIB)
    controller_expand(co, vol.volume_id, 11 * GIB)


def check_online_expansion(co, access_type: str, fs_type: str, size: int, bigger: int) -> None:
    vol = co.create(access_type=access_type, size=size, fs_type=fs_type)
    staging = co.stage(vol.volume_id, access_type, fs_type=fs_type)
    target = co.publish(vol.volume_id, access_type, staging, fs_type=fs_type)
    assert_size(access_type, target, size)
    if access_type == "mount":
        with open(os.path.join(target, "keep"), "w") as f:
            f.write("kept")

    controller_expand(co, vol.volume_id, bigger, access_type)
    node_expand(co, vol.volume_id, target, bigger)
    assert_size(access_type, target, bigger)
    assert all(d.size_bytes == bigger for d in loops_under(co.pool_dir))
    rsp = ok(co.stubs.node.NodeGetVolumeStats, csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=vol.volume_id, volume_path=target))
    if access_type == "block":
        assert rsp.usage[0].total == bigger
    else:
        with open(os.path.join(target, "keep")) as f:
            assert f.read() == "kept"


def test_online_expansion(co, access_type):
    check_online_expansion(co, access_type, *online_layout(access_type))


def test_ext4_online_expansion(co):
    """Grows online where the kernel lets it (CAP_SYS_RESOURCE); where it does not (this
    VM drops it), NodeExpand fails with a message that says so, and the data stays."""
    if has_cap_sys_resource():
        check_online_expansion(co, "mount", "ext4", SMALL, BIGGER)
        return
    vol = co.create(access_type="mount", size=SMALL, fs_type="ext4")
    staging = co.stage(vol.volume_id, "mount", fs_type="ext4")
    target = co.publish(vol.volume_id, "mount", staging, fs_type="ext4")
    with open(os.path.join(target, "keep"), "w") as f:
        f.write("kept")
    controller_expand(co, vol.volume_id, BIGGER, "mount")
    request = csi_pb2.NodeExpandVolumeRequest(
        volume_id=vol.volume_id, volume_path=target,
        capacity_range=csi_pb2.CapacityRange(required_bytes=BIGGER))
    with pytest.raises(grpc.RpcError) as e:
        co.stubs.node.NodeExpandVolume(request)
    assert "CAP_SYS_RESOURCE" in e.value.details()
    with open(os.path.join(target, "keep")) as f:
        assert f.read() == "kept"


def test_block_expansion_reaches_read_only_publishes_too(co):
    vol = co.create(access_type="block")
    staging = co.stage(vol.volume_id, "block")
    rw = co.publish(vol.volume_id, "block", staging)
    ro = co.publish(vol.volume_id, "block", staging, readonly=True)
    controller_expand(co, vol.volume_id, BIGGER, "block")
    node_expand(co, vol.volume_id, rw, BIGGER)
    assert block_device_size(rw) == BIGGER
    assert block_device_size(ro) == BIGGER


def test_expand_before_stage(co, access_type):
    """csi-sanity expands before staging: staging (and mkfs) use the current size."""
    vol = co.create(access_type=access_type)
    controller_expand(co, vol.volume_id, BIGGER, access_type)
    staging = co.stage(vol.volume_id, access_type)
    target = co.publish(vol.volume_id, access_type, staging)
    assert_size(access_type, target, BIGGER)
    node_expand(co, vol.volume_id, target, BIGGER)  # what the suite calls next
    assert_size(access_type, target, BIGGER)


def test_expand_between_stage_and_publish(co, access_type):
    fs_type, size, bigger = online_layout(access_type)
    vol = co.create(access_type=access_type, size=size, fs_type=fs_type)
    staging = co.stage(vol.volume_id, access_type, fs_type=fs_type)
    controller_expand(co, vol.volume_id, bigger, access_type)
    co.stage(vol.volume_id, access_type, staging, fs_type=fs_type)  # a retried stage
    target = co.publish(vol.volume_id, access_type, staging, fs_type=fs_type)
    node_expand(co, vol.volume_id, staging, bigger)
    assert_size(access_type, target, bigger)


def test_controller_expand_to_the_current_size_is_ok(co):
    vol = co.create()
    rsp = ok(co.stubs.controller.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=SMALL)))
    assert rsp.capacity_bytes == SMALL
