"""The node's storage pool: a directory on a copy-on-write filesystem.

Volumes and snapshots live in it through a layout (engine/layouts.py): btrfs subvolumes
(constant-time snapshots) or reflinked files on XFS. If the directory given is on neither,
the pool makes a sparse image (btrfs by default, or XFS with reflink=1) beside the state and
mounts it there, rather than silently running without copy-on-write.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from engine import command, fileops, permissions
from engine.errors import InvalidSpec, NotFound
from engine.layouts import FileLayout, Layout, SubvolumeLayout
from engine.loopdev import LoopDevices
from engine.mounts import Mounts

log = logging.getLogger(__name__)

MIB = 1024 * 1024
GIB = 1024 * MIB
IMAGE_FILESYSTEMS = ("btrfs", "xfs")
PROBE_DIR = ".probe"  # scratch files of the sector-size probe


@dataclass(frozen=True)
class PoolUsage:
    total_bytes: int
    free_bytes: int
    reserve_bytes: int


class Pool:
    def __init__(
        self,
        directory: str,
        image_path: str,
        image_size_bytes: int,
        *,
        image_fs: str = "xfs",
        loops: LoopDevices | None = None,
        mounts: Mounts | None = None,
    ):
        if image_fs not in IMAGE_FILESYSTEMS:
            raise InvalidSpec(f"pool image filesystem must be one of {IMAGE_FILESYSTEMS}")
        self.directory = os.path.abspath(directory)
        self.image_path = os.path.abspath(image_path)
        self.image_size_bytes = image_size_bytes
        self.image_fs = image_fs
        self.loops = loops or LoopDevices()
        self.mounts = mounts or Mounts()
        self.fs_type = ""
        self.sector_size_bytes = 4096
        self.layout: Layout = FileLayout(self.directory, "")

    # --- set-up ------------------------------------------------------------------
    def open(self) -> None:
        """Make the pool usable: adopt it as it is, or build the image once."""
        permissions.private_dir(self.directory)
        permissions.tighten(self.image_path, permissions.PRIVATE_FILE)
        if not self.mounts.is_mounted(self.directory) and os.path.exists(self.image_path):
            self._mount_image()
        if not fileops.supports_reflink(self.directory):
            if self.mounts.is_mounted(self.directory) or os.listdir(self.directory):
                raise InvalidSpec(
                    f"pool {self.directory} is not on a copy-on-write filesystem and is not "
                    "empty; give a btrfs or XFS (reflink=1) directory, or an empty one"
                )
            self._create_image()
            self._mount_image()
            os.chmod(self.directory, permissions.PRIVATE_DIR)  # the new root, 0755 from mkfs
        # Mounted, the directory is the filesystem's root: an older release left it 0755.
        permissions.tighten(self.directory, permissions.PRIVATE_DIR)
        self.fs_type = self._fs_type()
        if self.fs_type == "btrfs":
            self.layout = SubvolumeLayout(self.directory)
            self.sector_size_bytes = os.statvfs(self.directory).f_bsize
        else:
            self.layout = FileLayout(self.directory, self.fs_type)
        self.layout.setup()
        if self.fs_type != "btrfs":
            self.sector_size_bytes = self._probe_sector_size()
        log.info("pool %s ready (%s, %s, %d-byte sectors for new volumes)", self.directory,
                 self.fs_type, self.layout.kind, self.sector_size_bytes)

    def _probe_sector_size(self) -> int:
        """The smallest logical sector size at which a reflinked file keeps direct I/O.

        XFS reports a copy-on-write file's direct-write alignment as its block size, and
        the loop driver refuses direct I/O below it. Volumes are snapshotted and cloned,
        so probe with a reflinked file: 512 where the pool allows it, else 4096. Each
        volume keeps the size it was made with.
        """
        probe_dir = permissions.private_dir(os.path.join(self.directory, PROBE_DIR))
        src, dst = os.path.join(probe_dir, "src"), os.path.join(probe_dir, "clone")
        for path in (src, dst):
            if os.path.exists(path):
                os.unlink(path)
        try:
            fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL, permissions.PRIVATE_FILE)
            try:
                os.ftruncate(fd, 1 * MIB)
            finally:
                os.close(fd)
            fileops.reflink(src, dst)
            for size in (512, 4096):
                dev = self.loops.attach(dst, sector_size_bytes=size, strict_direct_io=False)
                self.loops.detach(dev.path)
                if dev.direct_io:
                    return size
        finally:
            for path in (src, dst):
                if os.path.exists(path):
                    os.unlink(path)
        raise InvalidSpec(f"pool {self.directory}: loop devices get no direct I/O at 512 or "
                          "4096-byte sectors")

    def _fs_type(self) -> str:
        """The filesystem of the deepest mount containing the pool directory."""
        real = os.path.realpath(self.directory)
        best, best_len = "unknown", -1
        for m in self.mounts.table():
            inside = real == m.target or real.startswith(m.target.rstrip("/") + "/")
            if inside and len(m.target) >= best_len:
                best, best_len = m.fs_type, len(m.target)
        return best

    def _create_image(self) -> None:
        log.info("creating %s pool image %s (%d GiB, sparse)", self.image_fs, self.image_path,
                 self.image_size_bytes // GIB)
        os.makedirs(os.path.dirname(self.image_path), exist_ok=True)
        tmp = self.image_path + ".partial"
        # every volume's data ends up in this file: owner-only from the first byte
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, permissions.PRIVATE_FILE)
        try:
            os.fchmod(fd, permissions.PRIVATE_FILE)  # a .partial left by a crash may be looser
            os.ftruncate(fd, self.image_size_bytes)
        finally:
            os.close(fd)
        if self.image_fs == "xfs":
            command.run(["mkfs.xfs", "-q", "-f", "-K", "-m", "reflink=1", tmp])
        else:
            command.run(["mkfs.btrfs", "-q", "-f", "-K", tmp])
        os.rename(tmp, self.image_path)
        fileops.fsync_dir(os.path.dirname(self.image_path))

    def _mount_image(self) -> None:
        existing = self.loops.by_backing_file(self.image_path)
        dev = existing[0] if existing else self.loops.attach(self.image_path)
        if not self.mounts.is_mounted(self.directory):
            fs = command.run(["blkid", "-p", "-o", "value", "-s", "TYPE", dev.path]).stdout.strip()
            self.mounts.mount(dev.path, self.directory, fs, ["noatime"])

    def teardown(self) -> None:
        """Unmount and detach a pool image (tests and uninstall; never on restart)."""
        self.mounts.unmount(self.directory)
        for dev in self.loops.by_backing_file(self.image_path):
            self.loops.detach(dev.path)

    # --- space -------------------------------------------------------------------
    def usage(self) -> PoolUsage:
        st = os.statvfs(self.directory)
        total = st.f_blocks * st.f_frsize
        # A small reserve that volumes cannot take, so metadata, snapshots' CoW and the
        # driver itself still have room when the pool is "full".
        reserve = max(64 * MIB, total // 50)
        return PoolUsage(total, st.f_bavail * st.f_frsize, reserve)

    # --- volumes and snapshots (names are engine-drawn hex) ------------------------
    @property
    def volumes_dir(self) -> str:
        return os.path.join(self.directory, "volumes")

    def volume_path(self, name: str) -> str:
        return self.layout.volume_path(name)

    def snapshot_path(self, name: str) -> str:
        return self.layout.snapshot_path(name)

    def create_volume(self, name: str, size_bytes: int) -> None:
        self.layout.create_volume(name, size_bytes)

    def clone_volume(self, source: str, name: str) -> None:
        self.layout.clone_volume(source, name)

    def snapshot_volume(self, volume: str, name: str) -> None:
        self.layout.snapshot_volume(volume, name)

    def restore_snapshot(self, snapshot: str, name: str) -> None:
        self.layout.restore_snapshot(snapshot, name)

    def delete_volume(self, name: str) -> None:
        self.layout.delete_volume(name)

    def delete_snapshot(self, name: str) -> None:
        self.layout.delete_snapshot(name)

    def resize_volume(self, name: str, size_bytes: int) -> None:
        path = self.volume_path(name)
        if not os.path.exists(path):
            raise NotFound(f"{path} is missing")
        if os.path.getsize(path) < size_bytes:
            os.truncate(path, size_bytes)
            fileops.fsync_path(path)

    def volume_exists(self, name: str) -> bool:
        return os.path.exists(self.volume_path(name))

    def snapshot_exists(self, name: str) -> bool:
        return os.path.exists(self.snapshot_path(name))

    def volumes(self) -> list[str]:
        return self.layout.volumes()

    def snapshots(self) -> list[str]:
        return self.layout.snapshots()

