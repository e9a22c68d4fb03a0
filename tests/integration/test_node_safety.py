"""The node path never destroys data and never leaves half a volume.

- a volume is staged only the way it was created for, and a device is formatted only when
  it carries no signature and no data (SEEK_DATA) that Tandem did not put there;
- staging and target paths never land on the node's system trees or the driver's own files;
- any failed stage or publish rolls back what it did (device, mount, directories, record)
  and the volume stays usable: a table of failures at each step.
"""

from __future__ import annotations

import os
import struct
import subprocess

import grpc
import pytest

from proto import csi_pb2
from tests import support
from tests.integration.helpers import (
    MIB,
    capability,
    create_request,
    mounts_under,
    pool_files,
    publish_request,
    stage_request,
    volume_image,
)

PATTERN = b"tandem-raw-data!" * 4096  # 64 KiB, no signature blkid knows


def code_of(call, request):
    with pytest.raises(grpc.RpcError) as e:
        call(request)
    return e.value.code(), e.value.details()


def backing_file(driver, volume_id: str) -> str:
    engine = driver.driver.engine
    return engine.files.path(engine.volume(volume_id))


def unstage(stubs, volume_id, staging):
    stubs.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume_id, staging_target_path=staging))


def unpublish(stubs, volume_id, target):
    stubs.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume_id, target_path=target))


def write_through_block_stage(stubs, test_root, volume_id, writes: list[tuple[int, bytes]]):
    """Stage as block, write through the loop device, unstage (as a block user would)."""
    staging, target = f"{test_root}/blk-staging", f"{test_root}/blk-dev"
    stubs.node.NodeStageVolume(stage_request(volume_id, staging, block=True))
    stubs.node.NodePublishVolume(publish_request(volume_id, staging, target, block=True))
    fd = os.open(target, os.O_WRONLY)
    try:
        for offset, data in writes:
            os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    unpublish(stubs, volume_id, target)
    unstage(stubs, volume_id, staging)


def dos_partition_table() -> bytes:
    """A DOS label with one partition: blkid reports PTTYPE=dos and no TYPE."""
    mbr = bytearray(512)
    struct.pack_into("<B3sB3sII", mbr, 446, 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, 100000)
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


# --- data is never formatted away ------------------------------------------------------
def test_a_block_volume_is_never_staged_as_a_filesystem(driver, stubs, test_root):
    vol = stubs.controller.CreateVolume(create_request("blk", block=True)).volume
    write_through_block_stage(stubs, test_root, vol.volume_id, [(1 * MIB, PATTERN)])
    got, details = code_of(stubs.node.NodeStageVolume,
                           stage_request(vol.volume_id, f"{test_root}/st"))
    assert got == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "created for block" in details
    with open(backing_file(driver, vol.volume_id), "rb") as f:
        f.seek(1 * MIB)
        assert f.read(len(PATTERN)) == PATTERN
    assert mounts_under(test_root) == []


def test_a_filesystem_volume_is_not_staged_as_a_block_device(stubs, test_root):
    vol = stubs.controller.CreateVolume(create_request("fs")).volume
    got, details = code_of(stubs.node.NodeStageVolume,
                           stage_request(vol.volume_id, f"{test_root}/st", block=True))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "created for mount" in details


@pytest.mark.parametrize("content", ["raw-data", "partition-table"])
def test_data_without_a_filesystem_is_never_formatted(driver, stubs, test_root, content):
    """A volume made for both access types (or one whose access type a record from before
    it was kept does not tell): the device's content alone must protect it."""
    req = create_request("both")
    req.volume_capabilities.append(capability(block=True))
    vol = stubs.controller.CreateVolume(req).volume
    writes = {"raw-data": [(1 * MIB, PATTERN)],
              "partition-table": [(0, dos_partition_table())]}[content]
    write_through_block_stage(stubs, test_root, vol.volume_id, writes)
    got, details = code_of(stubs.node.NodeStageVolume,
                           stage_request(vol.volume_id, f"{test_root}/st"))
    assert got == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "refusing to format" in details
    with open(backing_file(driver, vol.volume_id), "rb") as f:
        for offset, data in writes:
            f.seek(offset)
            assert f.read(len(data)) == data
    assert mounts_under(test_root) == []
    # the refused stage left nothing behind: the volume is still usable as a block device
    write_through_block_stage(stubs, test_root, vol.volume_id, [(2 * MIB, PATTERN)])


def test_a_filesystem_is_made_once_and_kept(stubs, test_root):
    vol = stubs.controller.CreateVolume(create_request("fs")).volume
    staging, target = f"{test_root}/st", f"{test_root}/tg"
    for _ in range(2):  # the second stage finds Tandem's filesystem and keeps it
        stubs.node.NodeStageVolume(stage_request(vol.volume_id, staging))
        stubs.node.NodePublishVolume(publish_request(vol.volume_id, staging, target))
        path = f"{target}/kept"
        if os.path.exists(path):
            with open(path) as f:
                assert f.read() == "written before"
        else:
            with open(path, "w") as f:
                f.write("written before")
        unpublish(stubs, vol.volume_id, target)
        unstage(stubs, vol.volume_id, staging)


def test_a_mkfs_cut_short_is_tandems_own_and_redone(test_root):
    """mkfs writes before it writes its signature: data found where Tandem's own mkfs was
    cut short is not a user's, and a retry formats it (the intent is recorded first)."""
    proc = support.DriverProcess(test_root, env={"TANDEM_CRASH_AT": "stage-format-started"})
    staging = f"{test_root}/st"
    try:
        proc.start()
        vol = proc.stubs().controller.CreateVolume(create_request("fs")).volume
        with pytest.raises(grpc.RpcError) as e:
            proc.stubs().node.NodeStageVolume(stage_request(vol.volume_id, staging))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        proc.wait_exit()
        # what a partial mkfs leaves: blocks written, no signature yet
        (pool_name,) = pool_files(test_root)
        with open(volume_image(test_root, pool_name), "r+b") as f:
            f.seek(4 * MIB)
            f.write(b"\xaa" * 65536)
        proc.env = {}
        proc.start()
        proc.stubs().node.NodeStageVolume(stage_request(vol.volume_id, staging))
        (entry,) = [m for m in support.Mounts().table() if m.target == staging]
        assert entry.fs_type == "ext4"
        unstage(proc.stubs(), vol.volume_id, staging)
    finally:
        proc.stop()


# --- paths: never the system's or the driver's own ---------------------------------------
def own_paths(root: str) -> dict[str, str]:
    os.symlink(f"{root}/state", f"{root}/to-state")
    return {
        "state-dir": f"{root}/state",
        "inside-state": f"{root}/state/inside",
        "pool": f"{root}/state/pool",
        "symlink-into-state": f"{root}/to-state/x",
        "above-state": root,
    }


@pytest.mark.parametrize("which", ["state-dir", "inside-state", "pool", "symlink-into-state",
                                   "above-state"])
def test_the_drivers_own_files_are_never_a_mount_point(driver, stubs, test_root, which):
    path = own_paths(test_root)[which]
    vol = stubs.controller.CreateVolume(create_request("p")).volume
    got, details = code_of(stubs.node.NodeStageVolume, stage_request(vol.volume_id, path))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "driver's own" in details, details
    stubs.node.NodeStageVolume(stage_request(vol.volume_id, f"{test_root}/st"))
    got, details = code_of(stubs.node.NodePublishVolume,
                           publish_request(vol.volume_id, f"{test_root}/st", path))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "driver's own" in details, details
    assert mounts_under(test_root) == [f"{test_root}/st"]
    # the driver still works: its state is where it was
    assert stubs.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
    unstage(stubs, vol.volume_id, f"{test_root}/st")


def test_system_trees_are_refused_by_default(stubs, test_root):
    """Only fresh paths below the system trees are tried (a regression must not mount over
    anything that exists), and whatever a regression made there is removed again; the unit
    tests (tests/unit/test_validation.py) check `/`, `/etc` and the rest on check_path."""
    vol = stubs.controller.CreateVolume(create_request("p")).volume
    fresh = f"tandem-test-{os.path.basename(test_root)}"
    paths = [f"/etc/{fresh}", f"/usr/local/{fresh}", f"/run/{fresh}", f"{test_root}/to-etc/x"]
    os.symlink(f"/etc/{fresh}", f"{test_root}/to-etc")
    try:
        for path in paths:
            got, details = code_of(stubs.node.NodeStageVolume,
                                   stage_request(vol.volume_id, path))
            assert got == grpc.StatusCode.INVALID_ARGUMENT, details
            assert "system tree" in details, details
            assert not os.path.lexists(path)
    finally:
        for path in paths[:3]:
            subprocess.run(["umount", "-R", path], capture_output=True)
            subprocess.run(["rm", "-rf", "--one-file-system", path], capture_output=True)


# --- failures roll back ---------------------------------------------------------------------
def file_at(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("not a directory")
    return path


def full_dir_at(path: str) -> str:
    os.makedirs(path)
    with open(f"{path}/data", "w") as f:
        f.write("somebody's")
    return path


# (case, access types, how to break the call, expected code)
STAGE_FAILURES = [
    ("staging-is-a-file", ["mount", "block"], lambda r: ("path", file_at(f"{r}/st")),
     grpc.StatusCode.FAILED_PRECONDITION),
    ("staging-parent-is-a-file", ["mount", "block"],
     lambda r: ("path", file_at(f"{r}/st") + "/sub"), grpc.StatusCode.FAILED_PRECONDITION),
    ("mount-fails", ["mount"], lambda r: ("flag", "no-such-mount-option"),
     grpc.StatusCode.INTERNAL),
    ("xfs-too-small", ["mount"], lambda r: ("fs", "xfs"), grpc.StatusCode.INVALID_ARGUMENT),
    ("after-intent", ["mount", "block"], lambda r: ("fail", "stage-after-intent"),
     grpc.StatusCode.INTERNAL),
    ("after-attach", ["mount", "block"], lambda r: ("fail", "stage-after-attach"),
     grpc.StatusCode.INTERNAL),
    ("mkfs-fails", ["mount"], lambda r: ("fail", "stage-format-started"),
     grpc.StatusCode.INTERNAL),
    ("after-mkfs", ["mount"], lambda r: ("fail", "stage-after-mkfs"), grpc.StatusCode.INTERNAL),
    ("after-mount", ["mount", "block"], lambda r: ("fail", "stage-after-mount"),
     grpc.StatusCode.INTERNAL),
]
STAGE_CASES = [(c, a, how, code) for c, kinds, how, code in STAGE_FAILURES for a in kinds]


def volume_is_whole_and_usable(stubs, test_root, vol, block: bool):
    """Nothing of the failed call is left, and everything works on the volume."""
    assert mounts_under(test_root) == []
    assert support.loops_gone(vol["file"]) == []
    # no stage record blocks a snapshot, a clone, or staging elsewhere
    snap = stubs.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        source_volume_id=vol["id"], name="after-failure")).snapshot
    clone_req = create_request("clone", block=block)
    clone_req.volume_content_source.volume.volume_id = vol["id"]
    clone = stubs.controller.CreateVolume(clone_req).volume
    staging, target = f"{test_root}/good-staging", f"{test_root}/good-target"
    stubs.node.NodeStageVolume(stage_request(vol["id"], staging, block))
    stubs.node.NodePublishVolume(publish_request(vol["id"], staging, target, block))
    unpublish(stubs, vol["id"], target)
    unstage(stubs, vol["id"], staging)
    stubs.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=clone.volume_id))
    stubs.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    stubs.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol["id"]))
    assert support.loops_gone(vol["ident"], os.path.basename(vol["file"])) == []


@pytest.mark.parametrize("case, access, how, code", STAGE_CASES,
                         ids=[f"{c}-{a}" for c, a, _, _ in STAGE_CASES])
def test_a_failed_stage_leaves_nothing(driver, stubs, test_root, monkeypatch, case, access,
                                       how, code):
    block = access == "block"
    v = stubs.controller.CreateVolume(create_request("v", block=block)).volume
    path = backing_file(driver, v.volume_id)
    st = os.stat(path)
    vol = {"id": v.volume_id, "file": path, "ident": (st.st_dev, st.st_ino)}
    req = stage_request(v.volume_id, f"{test_root}/st", block)
    kind, value = how(test_root)
    if kind == "path":
        req.staging_target_path = value
    elif kind == "flag":
        req.volume_capability.mount.mount_flags.append(value)
    elif kind == "fs":
        req.volume_capability.mount.fs_type = value
    else:
        monkeypatch.setenv("TANDEM_FAIL_AT", value)
    got, details = code_of(stubs.node.NodeStageVolume, req)
    assert got == code, details
    monkeypatch.delenv("TANDEM_FAIL_AT", raising=False)
    if kind == "path":
        os.unlink(f"{test_root}/st")
    assert not os.path.exists(f"{test_root}/st") or os.listdir(f"{test_root}/st") == []
    volume_is_whole_and_usable(stubs, test_root, vol, block)


# (case, access types, read-only, how to break the call, expected code)
PUBLISH_FAILURES = [
    ("target-is-a-file", ["mount"], False, lambda r: ("path", file_at(f"{r}/tg")),
     grpc.StatusCode.FAILED_PRECONDITION),
    ("target-is-a-full-directory", ["block"], False, lambda r: ("path", full_dir_at(f"{r}/tg")),
     grpc.StatusCode.FAILED_PRECONDITION),
    ("target-parent-is-a-file", ["mount", "block"], False,
     lambda r: ("path", file_at(f"{r}/tg") + "/sub"), grpc.StatusCode.FAILED_PRECONDITION),
    # the kernel takes no ro on a bind itself: a remount follows, and failing it must not
    # leave the bind behind, writable
    ("read-only-remount-fails", ["mount", "block"], True,
     lambda r: ("fail", "bind-before-remount"), grpc.StatusCode.INTERNAL),
    ("after-intent", ["mount", "block"], False, lambda r: ("fail", "publish-after-intent"),
     grpc.StatusCode.INTERNAL),
    ("after-mount", ["mount", "block"], False, lambda r: ("fail", "publish-after-mount"),
     grpc.StatusCode.INTERNAL),
    ("after-mount-read-only", ["block"], True, lambda r: ("fail", "publish-after-mount"),
     grpc.StatusCode.INTERNAL),
]
PUBLISH_CASES = [(c, a, ro, how, code) for c, kinds, ro, how, code in PUBLISH_FAILURES
                 for a in kinds]


@pytest.mark.parametrize("case, access, read_only, how, code", PUBLISH_CASES,
                         ids=[f"{c}-{a}" for c, a, _, _, _ in PUBLISH_CASES])
def test_a_failed_publish_leaves_nothing(driver, stubs, test_root, monkeypatch, case, access,
                                         read_only, how, code):
    block = access == "block"
    v = stubs.controller.CreateVolume(create_request("v", block=block)).volume
    path = backing_file(driver, v.volume_id)
    staging = f"{test_root}/st"
    stubs.node.NodeStageVolume(stage_request(v.volume_id, staging, block))
    staged_mounts = mounts_under(test_root)
    staged_loops = support.loops_on(path)
    req = publish_request(v.volume_id, staging, f"{test_root}/tg", block, readonly=read_only)
    kind, value = how(test_root)
    if kind == "path":
        req.target_path = value
    elif kind == "flag":
        req.volume_capability.mount.mount_flags.append(value)
    else:
        monkeypatch.setenv("TANDEM_FAIL_AT", value)
    got, details = code_of(stubs.node.NodePublishVolume, req)
    assert got == code, details
    monkeypatch.delenv("TANDEM_FAIL_AT", raising=False)
    # as it was before the call: staged, nothing published, no extra device
    assert mounts_under(test_root) == staged_mounts
    assert support.loops_on(path) == staged_loops
    if kind != "path":
        assert not os.path.lexists(f"{test_root}/tg")
    # no publish record is left to block the unstage
    unstage(stubs, v.volume_id, staging)
    assert support.loops_on(path) == []
    st = os.stat(path)
    if kind == "path":
        subprocess.run(["rm", "-rf", f"{test_root}/tg"], check=True)
    volume_is_whole_and_usable(
        stubs, test_root, {"id": v.volume_id, "file": path, "ident": (st.st_dev, st.st_ino)},
        block)
