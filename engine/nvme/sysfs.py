"""NVMe controllers and namespaces as the kernel shows them in sysfs.

A namespace's block device is found by its subsystem's NQN and its NSID (and checked
against its NGUID or WWID), never by its `nvmeXnY` name: the kernel numbers the devices
in the order it finds them, so NSID 2 attached alone shows as nvme0n1, and the numbers
change with every attach, rescan and reboot. With native multipath (Debian's default)
the device is the subsystem's head disk (`/sys/block/nvme0n1` -> nvme-subsys0); its
per-controller paths (`nvme0c0n1`) are hidden and never used. Without it the device
hangs off the controller itself. Both are read the same way: `device/subsysnqn` and
`nsid` beside the disk.

No udev runs here (nor in many node-plugin containers): a new device is awaited by
reading sysfs and checking its node in /dev, with a timeout.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass

from engine.errors import NotFound, Unavailable

_HIDDEN_PATH = re.compile(r"^nvme\d+c\d+n\d+$")  # a multipath member, not a disk to use


@dataclass(frozen=True)
class Controller:
    name: str  # "nvme0": its character device is /dev/nvme0
    subsysnqn: str
    cntlid: int
    state: str  # "live", "resetting", ...
    model: str
    serial: str


@dataclass(frozen=True)
class NamespaceDevice:
    """A namespace's block device (a Device of engine/backend.py)."""

    name: str  # "nvme0n1": only for messages and /dev paths, never an identity
    nsid: int
    subsysnqn: str
    major: int
    minor: int
    size_bytes: int
    block_bytes: int
    wwid: str
    nguid: str  # "" where the kernel shows none (a drive without one)
    read_only: bool
    dev_root: str = "/dev"

    @property
    def path(self) -> str:
        return os.path.join(self.dev_root, self.name)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def _read_or(path: str, default: str = "") -> str:
    try:
        return _read(path)
    except (FileNotFoundError, NotADirectoryError, OSError):
        return default


class NvmeSysfs:
    def __init__(self, sys_root: str = "/sys", dev_root: str = "/dev"):
        self.sys_root = sys_root
        self.dev_root = dev_root

    # --- controllers -------------------------------------------------------------------
    def controllers(self, subsysnqn: str = "") -> list[Controller]:
        base = os.path.join(self.sys_root, "class", "nvme")
        found = []
        for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            d = os.path.join(base, name)
            nqn = _read_or(os.path.join(d, "subsysnqn"))
            if subsysnqn and nqn != subsysnqn:
                continue
            try:
                cntlid = int(_read(os.path.join(d, "cntlid")))
            except (FileNotFoundError, ValueError):
                continue
            found.append(Controller(name, nqn, cntlid, _read_or(os.path.join(d, "state")),
                                    _read_or(os.path.join(d, "model")),
                                    _read_or(os.path.join(d, "serial"))))
        return found

    def controller(self, subsysnqn: str, name: str = "") -> Controller:
        """The live controller of the subsystem on this node (or the one named)."""
        found = [c for c in self.controllers(subsysnqn) if not name or c.name == name]
        if not found:
            known = sorted({c.subsysnqn for c in self.controllers()})
            raise NotFound(f"no NVMe controller of subsystem {subsysnqn!r} on this node "
                           f"(subsystems seen: {', '.join(known) or 'none'}; is the nvme "
                           "driver loaded?)")
        live = [c for c in found if c.state == "live"]
        if not live:
            raise Unavailable(f"the controllers of {subsysnqn} are not live "
                              f"({', '.join(c.name + ' ' + c.state for c in found)})")
        return live[0]

    def controller_dev(self, ctrl: Controller) -> str:
        return os.path.join(self.dev_root, ctrl.name)

    # --- namespaces --------------------------------------------------------------------
    def namespaces(self, subsysnqn: str) -> list[NamespaceDevice]:
        """The block devices of the subsystem's attached namespaces, by sysfs."""
        base = os.path.join(self.sys_root, "block")
        found = []
        for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            if not name.startswith("nvme") or _HIDDEN_PATH.match(name):
                continue
            d = os.path.join(base, name)
            if _read_or(os.path.join(d, "hidden")) == "1":
                continue
            if _read_or(os.path.join(d, "device", "subsysnqn")) != subsysnqn:
                continue
            try:
                nsid = int(_read(os.path.join(d, "nsid")))
                major, minor = (int(x) for x in _read(os.path.join(d, "dev")).split(":"))
                size = int(_read(os.path.join(d, "size"))) * 512
                block = int(_read(os.path.join(d, "queue", "logical_block_size")))
            except (FileNotFoundError, ValueError):
                continue  # going away while we read
            found.append(NamespaceDevice(
                name=name, nsid=nsid, subsysnqn=subsysnqn, major=major, minor=minor,
                size_bytes=size, block_bytes=block, wwid=_read_or(os.path.join(d, "wwid")),
                nguid=_read_or(os.path.join(d, "nguid")).replace("-", "").lower(),
                read_only=_read_or(os.path.join(d, "ro")) == "1", dev_root=self.dev_root))
        return found

    def namespace(self, subsysnqn: str, nsid: int) -> NamespaceDevice | None:
        for dev in self.namespaces(subsysnqn):
            if dev.nsid == nsid:
                return dev
        return None

    def _node_ready(self, dev: NamespaceDevice) -> bool:
        try:
            st = os.stat(dev.path)
        except FileNotFoundError:
            return False
        return stat.S_ISBLK(st.st_mode) and os.major(st.st_rdev) == dev.major \
            and os.minor(st.st_rdev) == dev.minor

    def wait_namespace(self, subsysnqn: str, nsid: int, timeout_s: float,
                       size_bytes: int = 0) -> NamespaceDevice:
        """Until the namespace's block device is in sysfs (with its size, when given) and
        its node in /dev is the right device."""
        deadline = time.monotonic() + timeout_s
        delay = 0.01
        while True:
            dev = self.namespace(subsysnqn, nsid)
            if dev is not None and (not size_bytes or dev.size_bytes >= size_bytes) \
                    and self._node_ready(dev):
                return dev
            if time.monotonic() > deadline:
                seen = f" (sysfs shows {dev.name}, {dev.size_bytes} bytes)" if dev else ""
                raise Unavailable(f"namespace {nsid} of {subsysnqn} got no block device "
                                  f"within {timeout_s:g} s{seen}; check `dmesg`")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def wait_gone(self, subsysnqn: str, nsid: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.namespace(subsysnqn, nsid) is not None:
            if time.monotonic() > deadline:
                raise Unavailable(f"namespace {nsid} of {subsysnqn} still has a block device "
                                  f"{timeout_s:g} s after its detach")
            time.sleep(0.02)
