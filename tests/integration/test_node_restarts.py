"""Restarts and reboots never wedge a volume.

- A driver restarted in a new mount namespace (every container restart or upgrade) still
  finds its loop devices, whose sysfs path is then relative to their filesystem: it
  unpublishes, unstages and deletes for real (checked in the kernel), or refuses while
  the volume is in use.
- After a reboot (every mount and loop device gone), unpublish, unstage and delete work;
  stage and publish bring the volume back; conditions say what the kernel shows.
"""

from __future__ import annotations

import os
import signal
import subprocess

import grpc
import pytest

from proto import csi_pb2
from tests import support
from tests.integration.helpers import (
    create_request,
    mounts_under,
    pool_files,
    publish_request,
    stage_request,
    volume_image,
)

PATTERN = b"block data kept " * 256  # 4 KiB


def code_of(call, request):
    with pytest.raises(grpc.RpcError) as e:
        call(request)
    return e.value.code(), e.value.details()


class Node:
    """A staged and published mount volume and block volume, with their files' identities."""

    def __init__(self, root: str, stubs):
        self.root = root
        self.stubs = stubs
        self.ids: dict[str, tuple[int, int]] = {}
        self.files: dict[str, str] = {}
        self.vols: dict[str, str] = {}
        for kind in ("mount", "block"):
            before = set(pool_files(root))
            vid = stubs.controller.CreateVolume(
                create_request(kind, block=kind == "block")).volume.volume_id
            (name,) = set(pool_files(root)) - before
            path = volume_image(root, name)
            st = os.stat(path)
            self.vols[kind], self.files[kind], self.ids[kind] = vid, path, (st.st_dev, st.st_ino)

    def staging(self, kind: str) -> str:
        return f"{self.root}/staging-{kind}"

    def target(self, kind: str, ro: bool = False) -> str:
        return f"{self.root}/target-{kind}" + ("-ro" if ro else "")

    def stage_and_publish(self, kind: str, ro_too: bool = False) -> None:
        block = kind == "block"
        self.stubs.node.NodeStageVolume(stage_request(self.vols[kind], self.staging(kind), block))
        self.publish(kind)
        if ro_too:
            self.publish(kind, ro=True)

    def publish(self, kind: str, ro: bool = False) -> None:
        self.stubs.node.NodePublishVolume(publish_request(
            self.vols[kind], self.staging(kind), self.target(kind, ro), kind == "block",
            readonly=ro))

    def unpublish(self, kind: str, ro: bool = False):
        return self.stubs.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=self.vols[kind], target_path=self.target(kind, ro)))

    def unstage(self, kind: str):
        return self.stubs.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=self.vols[kind], staging_target_path=self.staging(kind)))

    def delete(self, kind: str):
        return self.stubs.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=self.vols[kind]))

    def loops(self, kind: str) -> list[str]:
        """The kernel's loop devices on the volume's file (asked of losetup, by inode). The
        identity is read again while the file exists: a remounted pool gives its
        subvolumes new device numbers."""
        if os.path.exists(self.files[kind]):
            st = os.stat(self.files[kind])
            self.ids[kind] = (st.st_dev, st.st_ino)
        return support.loops_on(self.ids[kind], os.path.basename(self.files[kind]))

    def conditions(self) -> dict[str, csi_pb2.VolumeCondition]:
        listed = self.stubs.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
        by_id = {e.volume.volume_id: e.status.volume_condition for e in listed}
        return {kind: by_id[vid] for kind, vid in self.vols.items()}

    def release(self) -> None:
        """Test cleanup, old code included: detach whatever still holds the volumes' files."""
        for kind in self.ids:
            for dev in self.loops(kind):
                subprocess.run(["losetup", "-d", dev], capture_output=True)


def write_both(node: Node) -> None:
    with open(f"{node.target('mount')}/kept", "w") as f:
        f.write("written before")
    fd = os.open(node.target("block"), os.O_WRONLY)
    os.pwrite(fd, PATTERN, 1 << 20)
    os.fsync(fd)
    os.close(fd)


def check_both(node: Node) -> None:
    with open(f"{node.target('mount')}/kept") as f:
        assert f.read() == "written before"
    fd = os.open(node.target("block"), os.O_RDONLY)
    assert os.pread(fd, len(PATTERN), 1 << 20) == PATTERN
    os.close(fd)


# --- a restart in another mount namespace ----------------------------------------------------
@pytest.mark.parametrize("pool_fs", ["xfs", "btrfs"])  # btrfs: subvolumes, new st_dev per mount
def test_a_restart_in_a_new_mount_namespace_keeps_track_of_devices(test_root, pool_fs):
    # The kubelet's directory reaches the driver's container with Bidirectional propagation:
    # here test_root is shared between this namespace and the driver's own.
    subprocess.run(["mount", "--bind", test_root, test_root], check=True)
    subprocess.run(["mount", "--make-shared", test_root], check=True)
    proc = support.DriverProcess(test_root, wrap=["unshare", "--mount", "--propagation",
                                                  "unchanged"], extra=["--pool-fs", pool_fs])
    node = None
    pod: list[int] = []
    try:
        proc.start()
        node = Node(test_root, proc.stubs())
        node.stage_and_publish("mount")
        node.stage_and_publish("block", ro_too=True)
        write_both(node)
        # a pod keeps both volumes in use across the restart
        pod.append(os.open(f"{node.target('mount')}/kept", os.O_RDWR))
        pod.append(os.open(node.target("block"), os.O_RDWR))
        proc.stop()  # its mount namespace ends with it, as a container's does
        for kind in ("mount", "block"):
            for dev in node.loops(kind):  # what makes a path match fail from now on
                with open(f"/sys/block/{os.path.basename(dev)}/loop/backing_file") as f:
                    assert not f.read().startswith(test_root), "the namespace did not end"
        proc.start()
        node.stubs = proc.stubs()
        assert not any(c.abnormal for c in node.conditions().values()), node.conditions()
        for kind in ("mount", "block"):
            got, details = code_of(node.stubs.node.NodeUnpublishVolume,
                                   csi_pb2.NodeUnpublishVolumeRequest(
                                       volume_id=node.vols[kind],
                                       target_path=node.target(kind)))
            assert got == grpc.StatusCode.FAILED_PRECONDITION and "busy" in details, details
        check_both(node)  # refused, and nothing changed
        while pod:
            os.close(pod.pop())
        node.unpublish("mount")
        node.unstage("mount")
        assert node.loops("mount") == []
        node.unpublish("block")
        node.unpublish("block", ro=True)
        assert len(node.loops("block")) == 1, "the read-only device must be gone"
        # a process holding the device itself: the unstage is refused, nothing changes
        (dev,) = node.loops("block")
        pod.append(os.open(dev, os.O_RDONLY))
        got, details = code_of(node.stubs.node.NodeUnstageVolume,
                               csi_pb2.NodeUnstageVolumeRequest(
                                   volume_id=node.vols["block"],
                                   staging_target_path=node.staging("block")))
        assert got == grpc.StatusCode.FAILED_PRECONDITION and "held open" in details, details
        with open(f"/sys/block/{os.path.basename(dev)}/loop/autoclear") as f:
            assert f.read().strip() == "0", "the deferred detach must be taken back"
        os.close(pod.pop())
        assert node.loops("block") == [dev]
        node.unstage("block")
        assert node.loops("block") == []
        assert mounts_under(test_root) == []
        for kind in ("mount", "block"):
            node.delete(kind)
        assert pool_files(test_root) == []
    finally:
        for fd in pod:
            os.close(fd)
        proc.stop(signal.SIGKILL)
        if node is not None:
            node.release()


# --- a reboot -----------------------------------------------------------------------------------
def reboot(proc: support.DriverProcess, root: str) -> None:
    """Stop the driver, take every mount and loop device away (the pool's too), restart."""
    proc.stop()
    support.release_tree(root, keep=(root,))
    assert mounts_under(root, except_pool=False) == []
    proc.start()


@pytest.mark.parametrize("pool_fs", ["xfs", "btrfs"])
def test_after_a_reboot_a_volume_unpublishes_unstages_and_deletes(test_root, pool_fs):
    proc = support.DriverProcess(test_root, extra=["--pool-fs", pool_fs])
    node = None
    try:
        proc.start()
        node = Node(test_root, proc.stubs())
        node.stage_and_publish("mount")
        node.stage_and_publish("block", ro_too=True)
        reboot(proc, test_root)
        node.stubs = proc.stubs()
        for kind, cond in node.conditions().items():
            assert cond.abnormal and "loop device is gone" in cond.message, (kind, cond)
        stats = node.stubs.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=node.vols["mount"], volume_path=node.staging("mount")))
        assert stats.volume_condition.abnormal
        # something wrote into the bare target directory meanwhile: not the volume's data,
        # and no reason to refuse the unpublish (the kubelet would retry it forever)
        with open(f"{node.target('mount')}/stray", "w") as f:
            f.write("written while nothing was mounted")
        node.unpublish("mount")
        node.unpublish("mount")  # idempotent
        with open(f"{node.target('mount')}/stray") as f:
            assert f.read() == "written while nothing was mounted"
        os.unlink(f"{node.target('mount')}/stray")
        node.unpublish("mount")
        node.unpublish("block")
        node.unpublish("block")
        for kind in ("mount", "block"):
            assert not os.path.lexists(node.target(kind))
        node.unpublish("block", ro=True)
        for kind in ("mount", "block"):
            node.unstage(kind)
            node.unstage(kind)
            node.delete(kind)
        # what the kubelet sends for a volume deleted meanwhile: done, not NOT_FOUND forever
        os.makedirs(node.target("mount"))
        node.unpublish("mount")
        node.unstage("mount")
        assert pool_files(test_root) == [] and mounts_under(test_root) == []
    finally:
        proc.stop(signal.SIGKILL)
        if node is not None:
            node.release()


@pytest.mark.parametrize("pool_fs", ["xfs", "btrfs"])
def test_after_a_reboot_stage_and_publish_bring_a_volume_back(test_root, pool_fs):
    proc = support.DriverProcess(test_root, extra=["--pool-fs", pool_fs])
    node = None
    try:
        proc.start()
        node = Node(test_root, proc.stubs())
        node.stage_and_publish("mount")
        node.stage_and_publish("block")
        write_both(node)
        reboot(proc, test_root)
        node.stubs = proc.stubs()
        node.stage_and_publish("mount")  # the kubelet stages again, then publishes
        node.publish("block")  # a publish alone brings the staged device back too
        node.publish("block")
        check_both(node)
        assert not any(c.abnormal for c in node.conditions().values()), node.conditions()
        for kind in ("mount", "block"):
            assert len(node.loops(kind)) == 1
            node.unpublish(kind)
            node.unstage(kind)
            node.delete(kind)
        assert mounts_under(test_root) == []
    finally:
        proc.stop(signal.SIGKILL)
        if node is not None:
            node.release()


def test_a_snapshot_never_freezes_the_directory_a_reboot_left(driver, stubs, test_root):
    """The record says staged, the kernel shows nothing mounted: freezing the staging
    directory would freeze the filesystem under it (the host's; a tmpfs here, which
    refuses to freeze rather than freezing this machine)."""
    os.makedirs(f"{test_root}/host")
    subprocess.run(["mount", "-t", "tmpfs", "host", f"{test_root}/host"], check=True)
    staging = f"{test_root}/host/staging"
    vol = stubs.controller.CreateVolume(create_request("fs")).volume
    stubs.node.NodeStageVolume(stage_request(vol.volume_id, staging))
    with open(f"{staging}/kept", "w") as f:
        f.write("written before")
    # the node loses the mount and the device behind the driver's back
    subprocess.run(["umount", staging], check=True)
    for dev in support.loops_on(driver.driver.engine.files.path(
            driver.driver.engine.volume(vol.volume_id))):
        subprocess.run(["losetup", "-d", dev], check=True)
    cond = stubs.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
        volume_id=vol.volume_id)).status.volume_condition
    assert cond.abnormal and "loop device is gone" in cond.message
    snap = stubs.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        source_volume_id=vol.volume_id, name="after-reboot")).snapshot
    assert snap.ready_to_use
    stubs.node.NodeStageVolume(stage_request(vol.volume_id, staging))
    with open(f"{staging}/kept") as f:
        assert f.read() == "written before"
    stubs.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging))
