"""The node's storage pool: a directory on a reflink-capable filesystem.

Volumes are sparse files in it, so copy-on-write snapshots and clones are reflinks.
If the directory given is not on such a filesystem, the pool makes an XFS image
(reflink=1) beside the state and mounts it there, rather than silently running
without copy-on-write.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import tempfile
from dataclasses import dataclass

from engine import command, filesystem
from engine.errors import AlreadyExists, InvalidSpec, NotFound, OutOfCapacity
from engine.loopdev import LoopDevices
from engine.mounts import Mounts

log = logging.getLogger(__name__)

FICLONE = 0x40049409
MIB = 1024 * 1024
GIB = 1024 * MIB
VOLUMES_DIR = "volumes"
# Extent size hint for volume files: random 4 KiB writes would otherwise leave one
# extent per write, and a reflink costs per extent (see docs/engine.md).
EXTENT_HINT_BYTES = 1 * MIB


@dataclass(frozen=True)
class PoolUsage:
    total_bytes: int
    free_bytes: int
    reserve_bytes: int


def supports_reflink(directory: str) -> bool:
    """Try a real FICLONE between two small files in directory."""
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".reflink-probe-") as src:
        src.write(b"\0" * 4096)
        src.flush()
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".reflink-probe-") as dst:
            try:
                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                    return False
                raise
    return True


def reflink(src_path: str, dst_path: str) -> None:
    """Copy-on-write copy of a whole file (cost grows with extents, not bytes)."""
    src_fd = os.open(src_path, os.O_RDONLY)
    try:
        dst_fd = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
            os.fsync(dst_fd)
        except BaseException:
            os.close(dst_fd)
            os.unlink(dst_path)
            raise
        os.close(dst_fd)
    finally:
        os.close(src_fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Pool:
    def __init__(
        self,
        directory: str,
        image_path: str,
        image_size_bytes: int,
        *,
        loops: LoopDevices | None = None,
        mounts: Mounts | None = None,
    ):
        self.directory = os.path.abspath(directory)
        self.image_path = os.path.abspath(image_path)
        self.image_size_bytes = image_size_bytes
        self.loops = loops or LoopDevices()
        self.mounts = mounts or Mounts()
        self.fs_type = ""
        self.sector_size_bytes = 4096
        self.volumes_dir = os.path.join(self.directory, VOLUMES_DIR)

    # --- set-up ------------------------------------------------------------------
    def open(self) -> None:
        """Make the pool usable: adopt it as it is, or build the XFS image once."""
        os.makedirs(self.directory, exist_ok=True)
        if not self.mounts.is_mounted(self.directory) and os.path.exists(self.image_path):
            self._mount_image()
        if not supports_reflink(self.directory):
            if self.mounts.is_mounted(self.directory) or os.listdir(self.directory):
                raise InvalidSpec(
                    f"pool {self.directory} is not on a reflink-capable filesystem and is not "
                    "empty; give an XFS (reflink=1) or btrfs directory, or an empty one"
                )
            self._create_image()
            self._mount_image()
            if not supports_reflink(self.directory):
                raise InvalidSpec(f"pool image at {self.image_path} does not support reflink")
        self.fs_type = self._fs_type()
        os.makedirs(self.volumes_dir, exist_ok=True)
        if self.fs_type == "xfs":
            hint = EXTENT_HINT_BYTES // 1024
            command.run(["xfs_io", "-c", f"extsize {hint}k", "-c", f"cowextsize {hint}k",
                         self.volumes_dir])
        self.sector_size_bytes = self._probe_sector_size()
        log.info("pool %s ready (%s, %d-byte sectors for new volumes)", self.directory,
                 self.fs_type, self.sector_size_bytes)

    def _probe_sector_size(self) -> int:
        """The smallest logical sector size at which a reflinked file keeps direct I/O.

        XFS reports a copy-on-write file's direct-write alignment as its block size, and
        the loop driver refuses direct I/O below it; btrfs always wants its sector size.
        Volumes are snapshotted and cloned, so probe with a reflinked file: 512 where
        the pool allows it, else 4096. Each volume keeps the size it was made with.
        """
        src = os.path.join(self.volumes_dir, ".probe-src")
        dst = os.path.join(self.volumes_dir, ".probe-clone")
        for path in (src, dst):
            if os.path.exists(path):
                os.unlink(path)
        try:
            with open(src, "wb") as f:
                f.truncate(1 * MIB)
            reflink(src, dst)
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
        st = os.stat(self.directory)
        best = None
        for m in self.mounts.table():
            if (m.major, m.minor) == (os.major(st.st_dev), os.minor(st.st_dev)):
                best = m.fs_type
        return best or "unknown"

    def _create_image(self) -> None:
        log.info("creating XFS pool image %s (%d GiB, sparse)", self.image_path,
                 self.image_size_bytes // GIB)
        os.makedirs(os.path.dirname(self.image_path), exist_ok=True)
        tmp = self.image_path + ".partial"
        with open(tmp, "wb") as f:
            f.truncate(self.image_size_bytes)
        command.run(["mkfs.xfs", "-q", "-f", "-K", "-m", "reflink=1", tmp])
        os.rename(tmp, self.image_path)
        _fsync_dir(os.path.dirname(self.image_path))

    def _mount_image(self) -> None:
        existing = self.loops.by_backing_file(self.image_path)
        dev = existing[0] if existing else self.loops.attach(self.image_path)
        if not self.mounts.is_mounted(self.directory):
            self.mounts.mount(dev.path, self.directory, "xfs", ["noatime"])

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

    # --- volume files ------------------------------------------------------------
    def file_path(self, file_name: str) -> str:
        if "/" in file_name or file_name.startswith(".") or not file_name:
            raise InvalidSpec(f"bad pool file name {file_name!r}")
        return os.path.join(self.volumes_dir, file_name)

    def create_file(self, file_name: str, size_bytes: int) -> None:
        path = self.file_path(file_name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise AlreadyExists(f"{path} exists") from None
        try:
            os.ftruncate(fd, size_bytes)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            if e.errno in (errno.ENOSPC, errno.EFBIG):
                raise OutOfCapacity(f"pool cannot hold {size_bytes} bytes: {e}") from None
            raise
        os.close(fd)
        _fsync_dir(self.volumes_dir)

    def clone_file(self, src_name: str, dst_name: str) -> None:
        try:
            reflink(self.file_path(src_name), self.file_path(dst_name))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OutOfCapacity(f"pool is full: {e}") from None
            raise
        _fsync_dir(self.volumes_dir)

    def resize_file(self, file_name: str, size_bytes: int) -> None:
        path = self.file_path(file_name)
        if not os.path.exists(path):
            raise NotFound(f"{path} is missing")
        if os.path.getsize(path) < size_bytes:
            os.truncate(path, size_bytes)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def delete_file(self, file_name: str) -> None:
        # No fsync: callers drop the owning record first, and a file that reappears after
        # a power cut without a record is removed by reconcile.
        try:
            os.unlink(self.file_path(file_name))
        except FileNotFoundError:
            return

    def file_size(self, file_name: str) -> int:
        return os.path.getsize(self.file_path(file_name))

    def file_exists(self, file_name: str) -> bool:
        return os.path.exists(self.file_path(file_name))

    def list_files(self) -> list[str]:
        return sorted(n for n in os.listdir(self.volumes_dir) if not n.startswith("."))

    def allocated_bytes(self, file_name: str) -> int:
        return os.stat(self.file_path(file_name)).st_blocks * 512
