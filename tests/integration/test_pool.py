"""The pool: made as an XFS image when needed, used as is when already reflink-capable."""

import mmap
import os
import random
import subprocess
import time

import pytest

from engine.changed_blocks import Range, allocated, delta, written_extents
from engine.errors import InvalidSpec
from engine.fileops import supports_reflink
from engine.layouts import EXTENT_HINT_BYTES
from engine.loopdev import LoopDevices
from engine.pool import Pool
from proto import csi_pb2
from tests.integration.helpers import create_request, stage_request

GIB = 1024**3
MIB = 1024**2


NAME = "0" * 32


@pytest.mark.parametrize("fs, layout", [("btrfs", "subvolumes"), ("xfs", "files")])
def test_image_is_made_once_and_adopted_after(test_root, fs, layout):
    pool = Pool(f"{test_root}/pool", f"{test_root}/pool.img", 2 * GIB, image_fs=fs)
    pool.open()
    assert (pool.fs_type, pool.layout.kind) == (fs, layout)
    assert supports_reflink(pool.directory)
    pool.create_volume(NAME, 1 << 20)
    # a restart adopts the mounted pool; after an unmount it remounts the same image
    Pool(f"{test_root}/pool", f"{test_root}/pool.img", 2 * GIB, image_fs=fs).open()
    pool.teardown()
    again = Pool(f"{test_root}/pool", f"{test_root}/pool.img", 2 * GIB, image_fs=fs)
    again.open()
    assert again.volumes() == [NAME]
    assert os.path.getsize(again.volume_path(NAME)) == 1 << 20
    if fs == "xfs":
        hint = subprocess.run(["xfs_io", "-c", "extsize", again.volumes_dir],
                              capture_output=True, text=True).stdout
        assert f"[{EXTENT_HINT_BYTES}]" in hint  # extent size hint against fragmentation


def test_existing_reflink_filesystem_is_used_directly(test_root):
    image = f"{test_root}/mine.img"
    with open(image, "wb") as f:
        f.truncate(1 * GIB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", image], check=True)
    dev = LoopDevices().attach(image)
    mnt = f"{test_root}/xfs"
    os.makedirs(mnt)
    subprocess.run(["mount", dev.path, mnt], check=True)
    pool = Pool(mnt, f"{test_root}/unused.img", 2 * GIB)
    pool.open()
    assert not os.path.exists(f"{test_root}/unused.img")
    assert pool.usage().total_bytes < 1.1 * GIB


def test_non_empty_non_reflink_directory_is_refused(test_root):
    os.makedirs(f"{test_root}/plain")
    open(f"{test_root}/plain/someones-data", "w").close()
    with pytest.raises(InvalidSpec, match="not on a copy-on-write filesystem"):
        Pool(f"{test_root}/plain", f"{test_root}/p.img", 2 * GIB).open()
    assert os.listdir(f"{test_root}/plain") == ["someones-data"]


def test_staged_device_uses_direct_io_at_the_pools_sector_size(stubs, driver, test_root):
    vol = stubs.controller.CreateVolume(create_request("dio", block=True)).volume
    os.makedirs(f"{test_root}/st")
    stubs.node.NodeStageVolume(stage_request(vol.volume_id, f"{test_root}/st", block=True))
    prefix = f"{test_root}/state/pool/volumes/"
    (dev,) = [d for d in LoopDevices().all() if d.backing_file.startswith(prefix)]
    with open(f"/sys/block/{dev.name}/loop/dio") as f:
        assert f.read().strip() == "1"
    # 512 where a reflinked file keeps direct I/O at 512, else 4096 (XFS reflink today)
    pool = driver.driver.engine.files.pool
    assert dev.sector_size_bytes == pool.sector_size_bytes in (512, 4096)
    stubs.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=f"{test_root}/st"))
    assert not [d for d in LoopDevices().all() if d.backing_file.startswith(prefix)]


def test_clone_is_a_reflink_with_the_same_data(stubs, test_root):
    vol = stubs.controller.CreateVolume(create_request("src", block=True)).volume
    os.makedirs(f"{test_root}/st")
    stubs.node.NodeStageVolume(stage_request(vol.volume_id, f"{test_root}/st", block=True))
    prefix = f"{test_root}/state/pool/volumes/"
    (dev,) = [d for d in LoopDevices().all() if d.backing_file.startswith(prefix)]
    pattern = os.urandom(1 << 20)
    fd = os.open(dev.path, os.O_WRONLY)
    os.pwrite(fd, pattern, 4 << 20)
    os.fsync(fd)
    os.close(fd)
    clone_req = create_request("clone", block=True)
    clone_req.volume_content_source.volume.volume_id = vol.volume_id
    clone = stubs.controller.CreateVolume(clone_req).volume
    assert clone.content_source.volume.volume_id == vol.volume_id
    assert stubs.controller.CreateVolume(clone_req).volume.volume_id == clone.volume_id
    os.makedirs(f"{test_root}/st2")
    stubs.node.NodeStageVolume(stage_request(clone.volume_id, f"{test_root}/st2", block=True))
    (cdev,) = [d for d in LoopDevices().all()
               if d.backing_file.startswith(prefix) and d.name != dev.name]
    fd = os.open(cdev.path, os.O_RDONLY)
    assert os.pread(fd, 1 << 20, 4 << 20) == pattern
    os.close(fd)
    for vid, st in [(vol.volume_id, "st"), (clone.volume_id, "st2")]:
        stubs.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=f"{test_root}/{st}"))


def test_lost_device_and_lost_backing_are_reported_abnormal(stubs, test_root, driver):
    vol = stubs.controller.CreateVolume(create_request("lost", block=True)).volume
    staging, target = f"{test_root}/st", f"{test_root}/dev"
    os.makedirs(staging)
    stubs.node.NodeStageVolume(stage_request(vol.volume_id, staging, block=True))
    stubs.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging, target_path=target,
        volume_capability=stage_request(vol.volume_id, staging, block=True).volume_capability))
    stats = stubs.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=vol.volume_id, volume_path=target))
    assert not stats.volume_condition.abnormal
    # someone detaches the loop device behind the driver's back
    prefix = f"{test_root}/state/pool/volumes/"
    (dev,) = [d for d in LoopDevices().all() if d.backing_file.startswith(prefix)]
    subprocess.run(["losetup", "-d", dev.path], check=True)
    # the kernel defers a detach while anything holds the device open (any program on the
    # machine listing loop devices opens them for a moment): wait until it is really gone
    deadline = time.monotonic() + 10
    while LoopDevices().get(dev.name) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = stubs.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=vol.volume_id, volume_path=target))
    assert stats.volume_condition.abnormal and "loop device" in stats.volume_condition.message
    stubs.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=vol.volume_id, target_path=target))
    stubs.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging))
    # and the backing storage itself vanishes
    pool = driver.driver.engine.files.pool
    pool.delete_volume(driver.driver.engine.volume(vol.volume_id).pool_name)
    cond = stubs.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
        volume_id=vol.volume_id)).status.volume_condition
    assert cond.abnormal and "missing" in cond.message


def _write_4k_direct(path: str, block_numbers: list[int], fill: int) -> None:
    """4 KiB direct writes, as a volume's loop device issues them."""
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    buf.write(bytes([fill]) * 4096)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        for n in block_numbers:
            os.pwritev(fd, [buf], n * 4096)
    finally:
        os.close(fd)


@pytest.mark.parametrize("fs", ["btrfs", "xfs"])
def test_changed_blocks_stay_at_4k_granularity(test_root, fs):
    """Incremental backups send what delta() reports: an allocation unit larger than a
    write (an extent-size hint) must not widen it. Scattered 4 KiB writes before and
    after a snapshot are reported as exactly those 4 KiB ranges."""
    pool = Pool(f"{test_root}/pool", f"{test_root}/pool.img", 2 * GIB, image_fs=fs)
    pool.open()
    try:
        vol, snap1, snap2 = "1" * 32, "2" * 32, "3" * 32
        pool.create_volume(vol, 256 * MIB)
        path = pool.volume_path(vol)
        first = [0, 7, 300, 4099, 40000, 65535]
        _write_4k_direct(path, first, 0xA1)
        assert allocated(path) == [Range(n * 4096, 4096) for n in first]
        pool.snapshot_volume(vol, snap1)
        second = [1, 300, 5000, 65534]  # next to, on, and away from the first writes
        _write_4k_direct(path, second, 0xB2)
        pool.snapshot_volume(vol, snap2)
        expected = [Range(4096, 4096), Range(300 * 4096, 4096), Range(5000 * 4096, 4096),
                    Range(65534 * 4096, 4096)]
        assert delta(pool.snapshot_path(snap1), pool.snapshot_path(snap2)) == expected
    finally:
        pool.teardown()


def test_random_writes_leave_xfs_volumes_in_hint_sized_extents(test_root):
    """Fragmentation is bounded on XFS: 4 KiB writes in random order over a whole volume
    leave at most one extent per extent-size hint, so a sequential read of it (restore,
    backup, rebuild) runs at the speed of a sequentially written one."""
    pool = Pool(f"{test_root}/pool", f"{test_root}/pool.img", 2 * GIB, image_fs="xfs")
    pool.open()
    try:
        vol, size = "1" * 32, 32 * MIB
        pool.create_volume(vol, size)
        blocks = list(range(size // 4096))
        random.Random(12).shuffle(blocks)
        _write_4k_direct(pool.volume_path(vol), blocks, 0xC3)
        written = written_extents(pool.volume_path(vol))
        assert sum(e.length_bytes for e in written) == size
        assert len(written) <= size // EXTENT_HINT_BYTES
    finally:
        pool.teardown()
