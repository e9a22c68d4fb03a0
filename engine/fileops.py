"""Low-level file operations the pool builds on: reflink, fsync, extent maps."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import tempfile
from dataclasses import dataclass

from engine import waits

FICLONE = 0x40049409
FS_IOC_FIEMAP = 0xC020660B
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_NOCOW_FL = 0x00800000
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_SHARED = 0x2000
_FIEMAP_HEADER = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
# logical, physical, length, 2 reserved, flags, 3 reserved
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        with waits.io_wait():
            os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str, data: bytes | str, mode: int = 0o600) -> None:
    """Replace path with data in one step, durably: temp file, fsync, rename, fsync the
    directory. A reader (or a crash) sees the old file or the new one, never half."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data.encode() if isinstance(data, str) else data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with waits.io_wait():
            os.fsync(fd)
    finally:
        os.close(fd)


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


def set_nocow(path: str) -> None:
    """chattr +C: on btrfs, overwrite in place (no checksums, no CoW) until a snapshot shares
    the extent. Only takes effect on empty files and is inherited from directories."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
        flags = struct.unpack("=q", buf)[0] | FS_NOCOW_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("=q", flags))
    finally:
        os.close(fd)


def has_data(path: str) -> bool:
    """Whether any byte of the file was ever written (SEEK_DATA finds an extent): a fresh
    sparse volume has none, anything written through its device has some."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data at or after offset 0
            return False
        raise
    finally:
        os.close(fd)
    return True


@dataclass(frozen=True)
class Extent:
    offset_bytes: int
    physical_bytes: int
    length_bytes: int
    flags: int

    @property
    def written(self) -> bool:
        return not self.flags & FIEMAP_EXTENT_UNWRITTEN


def extents(path: str, batch: int = 1024) -> list[Extent]:
    """The file's extent map (FIEMAP), synced first so delayed allocations show."""
    out: list[Extent] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        start = 0
        flags = FIEMAP_FLAG_SYNC
        while True:
            buf = bytearray(_FIEMAP_HEADER.size + batch * _FIEMAP_EXTENT.size)
            _FIEMAP_HEADER.pack_into(buf, 0, start, (1 << 64) - 1 - start, flags, 0, batch, 0)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            mapped = _FIEMAP_HEADER.unpack_from(buf, 0)[3]
            if mapped == 0:
                return out
            last = False
            for i in range(mapped):
                f = _FIEMAP_EXTENT.unpack_from(buf, _FIEMAP_HEADER.size + i * _FIEMAP_EXTENT.size)
                ext = Extent(f[0], f[1], f[2], f[5])
                out.append(ext)
                last = bool(ext.flags & FIEMAP_EXTENT_LAST)
            if last:
                return out
            start = out[-1].offset_bytes + out[-1].length_bytes
            flags = 0
    finally:
        os.close(fd)
