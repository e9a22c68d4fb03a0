"""Stage, publish, unpublish, unstage, in both access types, checked in the kernel's tables.

Repeating NodeStage and NodePublish ten times must stack nothing (one loop device, one
mount per path, by source and by target); unpublish removes the target path; unstage
leaves the CO's staging directory empty; and the sanity suite's clean-up of volumes that
were never staged answers OK or NOT_FOUND without touching anything else.
"""

from __future__ import annotations

import os
import stat

from proto import csi_pb2
from tests.conformance.helpers import (
    ALREADY_EXISTS,
    FAILED_PRECONDITION,
    NOT_FOUND,
    OK,
    Mode,
    call,
    expect_code,
    expect_one_of,
    loops_left_under,
    loops_under,
    mountinfo,
    mounts_at,
    rpc_name,
    settled,
)


def mounts_of(dev) -> list:
    """Every mount whose source is this loop device: its filesystem, or the device node."""
    return [m for m in mountinfo() if m.dev == dev.dev or m.root == f"/{dev.name}"]


def test_stage_and_publish_ten_times_stack_nothing(co, access_type):
    vol = co.create(access_type=access_type)
    co.controller_publish(vol.volume_id, access_type)
    staging = co.stage(vol.volume_id, access_type, repeat=10)
    target = co.publish(vol.volume_id, access_type, staging, repeat=10)

    (dev,) = loops_under(co.pool_dir)  # one device, however often it was staged
    assert not dev.read_only
    if access_type == "mount":
        (fs,) = mounts_at(staging)
        assert fs.dev == dev.dev and fs.fs_type == "ext4"
        (bind,) = mounts_at(target)
        assert bind.dev == dev.dev and "rw" in bind.options
        assert sorted(m.target for m in mounts_of(dev)) == sorted([staging, target])
        assert os.path.isdir(target)
    else:
        assert mounts_at(staging) == []  # block: nothing mounted in the staging dir
        (bind,) = mounts_at(target)
        assert bind.root == f"/{dev.name}"
        assert [m.target for m in mounts_of(dev)] == [target]
        st = os.stat(target)
        assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == dev.dev

    co.unpublish(vol.volume_id, target, repeat=3)
    assert not os.path.lexists(target), "NodeUnpublishVolume must remove the target path"
    assert [m.target for m in mounts_of(dev)] == ([staging] if access_type == "mount" else [])
    co.unstage(vol.volume_id, staging, repeat=3)
    assert os.path.isdir(staging) and os.listdir(staging) == []
    assert mounts_at(staging) == []
    assert loops_left_under(co.pool_dir) == [], "unstage must detach the volume's device"


def test_cleanup_of_a_volume_never_staged(co, access_type):
    """The sanity suite's AfterEach: unpublish and unstage every volume it made."""
    vol = co.create(access_type=access_type)
    staging, target = co.staging_dir(), co.target_path()
    for _ in range(2):
        expect_one_of(co.stubs.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vol.volume_id, target_path=target), {OK, NOT_FOUND})
        expect_one_of(co.stubs.node.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging), {OK, NOT_FOUND})
    assert os.listdir(staging) == [] and not os.path.lexists(target)
    assert loops_left_under(co.pool_dir) == []


def test_cleanup_of_another_volume_leaves_a_staged_one_alone(co, access_type):
    """csi-sanity's clean-up unpublishes and unstages every volume it made at its one shared
    target and staging path. For a volume never staged there, that must answer OK or
    NOT_FOUND and leave alone the volume that is staged and published there."""
    staged = co.create(access_type=access_type)
    other = co.create(access_type=access_type)
    staging = co.stage(staged.volume_id, access_type, co.staging_dir("shared"))
    target = co.publish(staged.volume_id, access_type, staging, co.target_path("shared"))
    before = {staging: mounts_at(staging), target: mounts_at(target)}

    problems = []
    for method, request in [
        (co.stubs.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=other.volume_id, target_path=target)),
        (co.stubs.node.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(
            volume_id=other.volume_id, staging_target_path=staging)),
    ]:
        code, _, details = call(method, request)
        if code not in (OK, NOT_FOUND):
            problems.append(f"{rpc_name(method)} of the other volume: {code.name}: {details}")
        for p, mounts in before.items():
            if mounts_at(p) != mounts:
                problems.append(f"{rpc_name(method)} of the other volume changed the mounts "
                                f"at {p}: {len(mounts)} before, {len(mounts_at(p))} after")
                before[p] = mounts_at(p)
    assert not problems, "\n".join(problems)


def test_republish_with_other_readonly_is_already_exists(co, access_type):
    vol = co.create(access_type=access_type)
    staging = co.stage(vol.volume_id, access_type)
    target = co.publish(vol.volume_id, access_type, staging)
    before = mounts_at(target)
    expect_code(co.stubs.node.NodePublishVolume,
                co.publish_request(vol.volume_id, staging, target, access_type, readonly=True),
                ALREADY_EXISTS)
    assert mounts_at(target) == before


def test_read_only_publish_is_read_only_in_the_kernel(co, access_type):
    vol = co.create(access_type=access_type)
    staging = co.stage(vol.volume_id, access_type)
    target = co.publish(vol.volume_id, access_type, staging, readonly=True, repeat=10)
    (bind,) = mounts_at(target)
    assert "ro" in bind.options
    if access_type == "block":  # a read-only bind of a device node does not stop writes
        ro = [d for d in loops_under(co.pool_dir) if d.read_only]
        assert len(ro) == 1 and bind.root == f"/{ro[0].name}"
    co.unpublish(vol.volume_id, target)
    assert not os.path.lexists(target)
    left = settled(lambda: [d for d in loops_under(co.pool_dir) if d.read_only])
    assert not left, "the read-only device was left behind"


def test_single_writer_refuses_a_second_target(co, access_type):
    mode = Mode.SINGLE_NODE_SINGLE_WRITER
    vol = co.create(access_type=access_type, mode=mode)
    co.controller_publish(vol.volume_id, access_type, mode=mode)
    staging = co.stage(vol.volume_id, access_type, mode=mode)
    co.publish(vol.volume_id, access_type, staging, mode=mode)
    second = co.target_path()
    expect_code(co.stubs.node.NodePublishVolume,
                co.publish_request(vol.volume_id, staging, second, access_type, mode=mode),
                FAILED_PRECONDITION)
    assert not os.path.lexists(second) and mounts_at(second) == []


def test_multi_writer_allows_a_second_target(co, access_type):
    mode = Mode.SINGLE_NODE_MULTI_WRITER
    vol = co.create(access_type=access_type, mode=mode)
    co.controller_publish(vol.volume_id, access_type, mode=mode)
    staging = co.stage(vol.volume_id, access_type, mode=mode)
    first = co.publish(vol.volume_id, access_type, staging, mode=mode)
    second = co.publish(vol.volume_id, access_type, staging, mode=mode)
    assert len(mounts_at(first)) == 1 and len(mounts_at(second)) == 1
    for target in (first, second):
        co.unpublish(vol.volume_id, target)
        assert not os.path.lexists(target)
