"""Filesystems on block devices: detect, make, grow, measure."""

from __future__ import annotations

import os
from dataclasses import dataclass

from engine import command
from engine.errors import CommandFailed, InvalidSpec

# mkfs.xfs refuses filesystems smaller than this (xfsprogs >= 5.19).
XFS_MIN_BYTES = 300 * 1024 * 1024


@dataclass(frozen=True)
class Signature:
    """What blkid recognises on a device: a filesystem, a partition table, a RAID or LVM
    member, swap, an encrypted container..."""

    type: str  # "ext4", "xfs", "swap", "LVM2_member", "dos", "gpt"...
    usage: str  # "filesystem", "raid", "crypto", "other", or "partition table"

    @property
    def is_filesystem(self) -> bool:
        return self.usage == "filesystem"


def probe(device: str) -> Signature | None:
    """Any signature on device, None when blkid recognises nothing. Probes the device
    itself (-p: no cache), and looks for partition tables as well as filesystems."""
    proc = command.run(["blkid", "-p", "-o", "export", device], check=False)
    if proc.returncode == 2:  # nothing recognised
        return None
    if proc.returncode == 8:  # several signatures that contradict each other
        return Signature("ambivalent", "several signatures")
    if proc.returncode != 0:
        raise CommandFailed(["blkid", "-p", device], proc.returncode, proc.stdout, proc.stderr)
    fields = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    if fields.get("TYPE"):
        return Signature(fields["TYPE"], fields.get("USAGE", "other"))
    if fields.get("PTTYPE"):
        return Signature(fields["PTTYPE"], "partition table")
    # blkid found something it cannot name: treat it as a signature all the same
    return Signature("unknown", "other")


def check_size(fs_type: str, size_bytes: int) -> None:
    """Refuse, before any side effect, a filesystem the device is too small for."""
    if fs_type == "xfs" and size_bytes < XFS_MIN_BYTES:
        raise InvalidSpec(f"xfs needs at least {XFS_MIN_BYTES // 2**20} MiB; the volume has "
                          f"{size_bytes // 2**20} MiB")


def make(device: str, fs_type: str, size_bytes: int = 0) -> None:
    """Make fs_type on device, covering size_bytes of it (0: the whole device; a backend
    keeps a label past the volume's bytes that no filesystem may cover)."""
    # Skip discard: the device is a fresh sparse file (or a new namespace), already zero.
    if fs_type == "ext4":
        argv = ["mkfs.ext4", "-F", "-q", "-E", "nodiscard,lazy_itable_init=1", device]
        if size_bytes:
            argv.append(f"{size_bytes // 1024}k")
        command.run(argv)
    elif fs_type == "xfs":
        argv = ["mkfs.xfs", "-f", "-q", "-K", device]
        if size_bytes:
            argv[-1:-1] = ["-d", f"size={size_bytes}"]
        command.run(argv)
    else:
        raise InvalidSpec(f"cannot make filesystem {fs_type!r}")


def ext4_bytes(device: str) -> int:
    """The size of the ext4 filesystem on device (from its superblock)."""
    out = command.run(["dumpe2fs", "-h", device]).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return int(fields["Block count"]) * int(fields["Block size"])


def grow_unmounted(fs_type: str, device: str, size_bytes: int) -> bool:
    """Grow an unmounted filesystem to size_bytes if it is smaller (a volume expanded while
    nothing used it: growth offline needs no CAP_SYS_RESOURCE, which online ext4 growth
    does). xfs grows only mounted: it is left to the online path. True when it grew."""
    if fs_type != "ext4" or ext4_bytes(device) >= size_bytes:
        return False
    command.run(["e2fsck", "-f", "-p", device])  # resize2fs insists on a checked filesystem
    command.run(["resize2fs", device, f"{size_bytes // 1024}K"])
    return True


def grow(fs_type: str, device: str, mount_point: str, size_bytes: int = 0) -> None:
    """Grow a mounted filesystem online to its device's size (or to size_bytes)."""
    if fs_type == "ext4":
        try:
            command.run(["resize2fs", device, *([f"{size_bytes // 1024}K"] if size_bytes
                                                else [])])
        except CommandFailed as e:
            if "Permission denied" in e.stderr:
                # the kernel's online ext4 resize needs CAP_SYS_RESOURCE
                raise CommandFailed(e.argv, e.returncode, e.stdout, e.stderr + (
                    "\nonline ext4 growth needs CAP_SYS_RESOURCE, which this driver lacks; "
                    "the filesystem grows at the volume's next stage (unstaged, it is grown "
                    "before it is mounted)")) from None
            raise
    elif fs_type == "xfs":
        blocks = ["-D", f"{size_bytes // os.statvfs(mount_point).f_frsize}"] if size_bytes else []
        command.run(["xfs_growfs", *blocks, mount_point])
    else:
        raise InvalidSpec(f"cannot grow filesystem {fs_type!r}")


@dataclass(frozen=True)
class FsUsage:
    total_bytes: int
    available_bytes: int
    used_bytes: int
    total_inodes: int
    free_inodes: int
    used_inodes: int


def usage(path: str) -> FsUsage:
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return FsUsage(
        total_bytes=total,
        available_bytes=st.f_bavail * st.f_frsize,
        used_bytes=total - st.f_bfree * st.f_frsize,
        total_inodes=st.f_files,
        free_inodes=st.f_ffree,
        used_inodes=st.f_files - st.f_ffree,
    )
