"""btrfs subvolumes through their ioctls (no process per call: create/delete are on the
control path's hot loop)."""

from __future__ import annotations

import fcntl
import os
import struct

from engine.errors import InvalidSpec

# Arguments go as bytearrays: fcntl.ioctl copies immutable arguments into a 1 KiB buffer.
_VOL_ARGS = struct.Struct("=q4088s")  # fd, name
_VOL_ARGS_V2 = struct.Struct("=qQQ32s4040s")  # fd, transid, flags, (size, qgroup), name
BTRFS_IOC_SUBVOL_CREATE = 0x5000940E
BTRFS_IOC_SNAP_DESTROY = 0x5000940F
BTRFS_IOC_SNAP_CREATE_V2 = 0x50009417
BTRFS_IOC_SYNC = 0x9408
BTRFS_SUBVOL_RDONLY = 1 << 1


def _name(name: str) -> bytes:
    if not name or "/" in name or name in (".", ".."):
        raise InvalidSpec(f"bad subvolume name {name!r}")
    return name.encode()


def _dir_fd(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def create_subvolume(parent: str, name: str) -> None:
    fd = _dir_fd(parent)
    try:
        fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_CREATE, bytearray(_VOL_ARGS.pack(0, _name(name))))
    finally:
        os.close(fd)


def snapshot(source: str, parent: str, name: str, *, read_only: bool) -> None:
    """Snapshot the subvolume at `source` as parent/name: constant time, whatever its size."""
    src = _dir_fd(source)
    dst = _dir_fd(parent)
    try:
        flags = BTRFS_SUBVOL_RDONLY if read_only else 0
        args = _VOL_ARGS_V2.pack(src, 0, flags, b"", _name(name))
        fcntl.ioctl(dst, BTRFS_IOC_SNAP_CREATE_V2, bytearray(args))
    finally:
        os.close(src)
        os.close(dst)


def delete_subvolume(parent: str, name: str) -> None:
    fd = _dir_fd(parent)
    try:
        fcntl.ioctl(fd, BTRFS_IOC_SNAP_DESTROY, bytearray(_VOL_ARGS.pack(0, _name(name))))
    finally:
        os.close(fd)


def is_subvolume(path: str) -> bool:
    # the root directory of every btrfs subvolume has inode number 256
    try:
        return os.stat(path).st_ino == 256
    except FileNotFoundError:
        return False


def sync(path: str) -> None:
    """Commit the transaction and wake the cleaner, which frees deleted subvolumes."""
    fd = _dir_fd(path)
    try:
        fcntl.ioctl(fd, BTRFS_IOC_SYNC)
    finally:
        os.close(fd)
