"""Loop devices: attach a file with direct I/O, find them again, resize, detach.

The kernel is the source of truth: a device is found through
/sys/block/loopN/loop/backing_file, never through our own notes. No udev runs on
every node, so the device node is awaited through sysfs/devtmpfs with a timeout.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from engine import command
from engine.errors import CommandFailed, InvalidSpec, NotFound

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
        with open(os.path.join(self.sys_root, "block", name, rel), encoding="utf-8") as f:
            return f.read().strip()

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
        if backing.endswith(" (deleted)"):
            backing = backing[: -len(" (deleted)")]
        return LoopDevice(name, major, minor, backing, read_only, dio, sector, size)

    def all(self) -> list[LoopDevice]:
        found = []
        for name in sorted(os.listdir(os.path.join(self.sys_root, "block"))):
            if name.startswith("loop"):
                dev = self.get(name)
                if dev is not None:
                    found.append(dev)
        return found

    def by_backing_file(self, path: str) -> list[LoopDevice]:
        real = os.path.realpath(path)
        return [d for d in self.all() if d.backing_file in (path, real)]

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

    def detach(self, dev_path: str, timeout_s: float = 30.0) -> None:
        """Detach; a device that is already free is fine (idempotent)."""
        if self.by_path(dev_path) is None:
            return
        try:
            command.run(["losetup", "--detach", dev_path], timeout_s=timeout_s)
        except CommandFailed:
            if self.by_path(dev_path) is not None:
                raise

    def refresh_capacity(self, dev_path: str) -> LoopDevice:
        """Make the device see its backing file's new size (after a resize)."""
        command.run(["losetup", "--set-capacity", dev_path])
        dev = self.by_path(dev_path)
        if dev is None:
            raise NotFound(f"{dev_path} vanished while refreshing its capacity")
        return dev
