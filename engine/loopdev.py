"""Loop devices: attach a file with direct I/O, find them again, resize, detach.

The kernel is the source of truth: a device is found by its backing file's device and
inode (LOOP_GET_STATUS64), never through our own notes and never by path alone.
/sys/block/loopN/loop/backing_file shows the path as the mount namespace that attached
the device saw it; once that namespace is gone (every container restart or upgrade) it
shows the path relative to the filesystem instead (`/volumes/<id>/data.img`), so a path
match would lose the device. No udev runs on every node, so the device node is awaited
through sysfs/devtmpfs with a timeout.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass

from engine import command
from engine.errors import CommandFailed, InUse, InvalidSpec, NotFound

LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LO_FLAGS_AUTOCLEAR = 4
# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit, lo_number,
# lo_encrypt_type, lo_encrypt_key_size, lo_flags, file name, crypt name, key, lo_init[2]
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")
_LO_FLAGS_OFFSET = 52
# how long a detach may take to show (another process may hold the device for a moment)
DETACH_SETTLE_S = 1.0

FileId = tuple[int, int]  # a file's (st_dev, st_ino): its identity in any mount namespace


def file_id(path: str) -> FileId | None:
    """The identity of the file at path (symlinks followed), None when it does not exist."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def _decode_huge_dev(value: int) -> int:
    """The kernel's huge_encode_dev() format (lo_device) as a userspace dev_t."""
    major = (value >> 8) & 0xFFF
    minor = (value & 0xFF) | ((value >> 12) & 0xFFF00)
    return os.makedev(major, minor)

# losetup --find picks the first free device; serialise our own attaches so two
# threads never race for the same number (other processes are handled by losetup's retry).
_attach_lock = threading.Lock()
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopDevice:
    name: str  # "loop7"
    major: int
    minor: int
    backing_file: str
    read_only: bool
    direct_io: bool
    sector_size_bytes: int
    size_bytes: int

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"


class LoopDevices:
    def __init__(self, sys_root: str = "/sys", dev_root: str = "/dev"):
        self.sys_root = sys_root
        self.dev_root = dev_root

    # --- reading the kernel's view -------------------------------------------------
    def _read(self, name: str, rel: str) -> str:
        """A sysfs attribute; FileNotFoundError when the device is not bound (any more).

        A device another process detaches as we read it answers ENODEV or ENXIO (seen
        with several drivers, or other programs, attaching and detaching side by side):
        that is "not bound" too, not an error."""
        try:
            # os-level calls: scans read this for every loop device on every delete
            fd = os.open(f"{self.sys_root}/block/{name}/{rel}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                return os.read(fd, 8192).decode("utf-8", "surrogateescape").strip()
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.ENXIO):
                raise FileNotFoundError(e.errno, f"loop device {name} went away") from None
            raise

    def get(self, name: str) -> LoopDevice | None:
        """The loop device `name` if it is bound to a file, else None."""
        try:
            backing = self._read(name, "loop/backing_file")
            major, minor = (int(x) for x in self._read(name, "dev").split(":"))
            read_only = self._read(name, "ro") == "1"
            dio = self._read(name, "loop/dio") == "1"
            sector = int(self._read(name, "queue/logical_block_size"))
            size = int(self._read(name, "size")) * 512
        except (FileNotFoundError, ValueError):
            return None
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.ENXIO):
                return None  # detached (by another process) while we read its attributes
            raise
        if backing.endswith(" (deleted)"):
            backing = backing[: -len(" (deleted)")]
        return LoopDevice(name, major, minor, backing, read_only, dio, sector, size)

    def all(self) -> list[LoopDevice]:
        found = []
        for name in self._maybe_bound():
            dev = self.get(name)
            if dev is not None:
                found.append(dev)
        return found

    def backing_id(self, dev: LoopDevice) -> FileId | None:
        """The (device, inode) of the file behind dev, from the kernel; None when unbound."""
        info = self._status(dev.name)
        if info is None:
            return None
        lo_device, lo_inode = _LOOP_INFO64.unpack_from(info, 0)[:2]
        return _decode_huge_dev(lo_device), lo_inode

    def _status(self, name: str) -> bytearray | None:
        try:
            fd = os.open(os.path.join(self.dev_root, name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENXIO):
                return None
            raise
        try:
            buf = bytearray(_LOOP_INFO64.size)
            fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
            return buf
        except OSError as e:
            if e.errno == errno.ENXIO:  # not bound (any more)
                return None
            raise
        finally:
            os.close(fd)

    def _maybe_bound(self) -> list[str]:
        """Loop devices that may be bound to a file, in name order.

        On the real /proc and /sys: the ones /proc/partitions lists, one read for all
        (the kernel lists a disk there only while it has a capacity, which an unbound loop
        device never has); a node keeps dozens of unbound devices, and reading each one's
        sysfs attributes on every delete cost more than the rest of DeleteVolume. A
        device bound to an empty file is left out: nothing can be written through it."""
        if self.sys_root == "/sys":
            try:
                with open("/proc/partitions", "rb") as f:
                    text = f.read().decode("ascii", "replace")
            except OSError:
                pass
            else:
                rows = (line.split() for line in text.splitlines()[2:])
                return sorted(r[3] for r in rows if len(r) == 4 and r[3].startswith("loop"))
        return sorted(n for n in os.listdir(f"{self.sys_root}/block") if n.startswith("loop"))

    def identified(self, basenames: Collection[str]) -> list[tuple[LoopDevice, FileId]]:
        """Bound devices whose backing file is named one of basenames, with its identity.

        The name filter is only there to leave other programs' devices alone: opening a
        device while its owner detaches it turns the detach into a deferred one. The
        basename survives a mount namespace's end; the directory part does not.
        """
        found = []
        for name in self._maybe_bound():
            try:
                backing = self._read(name, "loop/backing_file")
            except FileNotFoundError:
                continue  # not bound
            if os.path.basename(backing.removesuffix(" (deleted)")) not in basenames:
                continue
            dev = self.get(name)
            ident = self.backing_id(dev) if dev is not None else None
            if dev is not None and ident is not None:
                found.append((dev, ident))
        return found

    def by_backing_file(self, path: str) -> list[LoopDevice]:
        """Every loop device on the file at path, found by its device and inode."""
        ident = file_id(path)
        if ident is None:
            return []
        names = {os.path.basename(path)}
        if os.path.islink(path):  # only a link as the last component changes the name
            names.add(os.path.basename(os.path.realpath(path)))
        return [d for d, i in self.identified(names) if i == ident]

    def holds(self, dev: LoopDevice, path: str) -> bool:
        """Whether dev is (still) bound to the file at path."""
        ident = file_id(path)
        return ident is not None and self.backing_id(dev) == ident

    def by_path(self, dev_path: str) -> LoopDevice | None:
        return self.get(os.path.basename(dev_path))

    # --- changing it ---------------------------------------------------------------
    def attach(
        self,
        path: str,
        *,
        read_only: bool = False,
        sector_size_bytes: int = 512,
        direct_io: bool = True,
        strict_direct_io: bool = True,
        timeout_s: float = 30.0,
    ) -> LoopDevice:
        """Attach `path` to a free loop device and wait until it is usable.

        When direct I/O is asked for and the kernel refuses it, strict mode detaches and
        raises; otherwise the device stays, buffered, with a warning (better a slow volume
        than one that cannot be staged).
        """
        argv = ["losetup", "--find", "--show", f"--sector-size={sector_size_bytes}"]
        argv.append("--direct-io=on" if direct_io else "--direct-io=off")
        if read_only:
            argv.append("--read-only")
        argv.append(path)
        with _attach_lock:
            out = command.run(argv, timeout_s=timeout_s).stdout.strip()
        name = os.path.basename(out)
        dev = self._wait_ready(name, timeout_s)
        if direct_io and not dev.direct_io:
            # Without direct I/O a loop device double-caches every page and serialises
            # writes: never silently.
            if strict_direct_io:
                self.detach(dev.path)
                raise InvalidSpec(
                    f"{path}: the pool's filesystem refused direct I/O for {dev.path} at "
                    f"{sector_size_bytes}-byte sectors")
            log.warning("%s: direct I/O refused at %d-byte sectors; %s runs buffered",
                        path, sector_size_bytes, dev.path)
        return dev

    def _wait_ready(self, name: str, timeout_s: float) -> LoopDevice:
        deadline = time.monotonic() + timeout_s
        while True:
            dev = self.get(name)
            if dev is not None and os.path.exists(os.path.join(self.dev_root, name)):
                return dev
            if time.monotonic() > deadline:
                raise NotFound(f"loop device {name} did not appear within {timeout_s}s")
            time.sleep(0.01)

    def detach(self, dev_path: str, backing: FileId | None = None, *,
               require_released: bool = False, timeout_s: float = 30.0) -> None:
        """Detach; a free device is fine (idempotent).

        `backing`: the identity the device must still have (a number freed meanwhile may
        already serve another file, which is not ours to detach). The kernel answers a
        detach of a device someone still holds open (a mount in another mount namespace, a
        process) with success and only marks it to detach on last close. With
        `require_released` that is InUse, and the mark is taken back so nothing changes
        behind the caller's back; without, the deferred detach is accepted.
        """
        dev = self.by_path(dev_path)
        if dev is None or (backing is not None and self.backing_id(dev) != backing):
            return
        ident = backing or self.backing_id(dev)
        try:
            command.run(["losetup", "--detach", dev_path], timeout_s=timeout_s)
        except CommandFailed:
            if self._still_bound(dev, ident):
                raise
        if not require_released:
            return
        deadline = time.monotonic() + DETACH_SETTLE_S
        while self._still_bound(dev, ident):
            if time.monotonic() > deadline:
                self._clear_autoclear(dev)
                raise InUse(f"{dev_path} is still held open (by a mount in another mount "
                            "namespace or by a process); release it first")
            time.sleep(0.02)

    def _still_bound(self, dev: LoopDevice, ident: FileId | None) -> bool:
        current = self.get(dev.name)
        return current is not None and (ident is None or self.backing_id(current) == ident)

    def _clear_autoclear(self, dev: LoopDevice) -> None:
        """Take back the deferred detach the kernel armed (best effort)."""
        try:
            fd = os.open(os.path.join(self.dev_root, dev.name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            buf = bytearray(_LOOP_INFO64.size)
            fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
            flags = struct.unpack_from("=I", buf, _LO_FLAGS_OFFSET)[0]
            struct.pack_into("=I", buf, _LO_FLAGS_OFFSET, flags & ~LO_FLAGS_AUTOCLEAR)
            fcntl.ioctl(fd, LOOP_SET_STATUS64, buf)
        except OSError as e:
            log.warning("%s stays marked to detach on last close: %s", dev.path, e)
        finally:
            os.close(fd)

    def refresh_capacity(self, dev_path: str) -> LoopDevice:
        """Make the device see its backing file's new size (after a resize)."""
        command.run(["losetup", "--set-capacity", dev_path])
        dev = self.by_path(dev_path)
        if dev is None:
            raise NotFound(f"{dev_path} vanished while refreshing its capacity")
        return dev
