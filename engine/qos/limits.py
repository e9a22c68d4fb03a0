"""Limit values and the kernel's rule files that hold them (cgroup v2 io.max, v1 blkio.throttle).

Zero always means "no limit", as in QosSpec. A rule is per block device (major, minor).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from engine.errors import InvalidSpec, NotFound
from engine.qos.tiers import QosSpec

# QosSpec's bandwidth is in MB/s; decimal megabytes, as storage vendors quote them.
BYTES_PER_MB = 1_000_000

Device = tuple[int, int]

V2_IO_MAX = "io.max"
V1_FILES = {
    "read_iops": "blkio.throttle.read_iops_device",
    "write_iops": "blkio.throttle.write_iops_device",
    "read_bps": "blkio.throttle.read_bps_device",
    "write_bps": "blkio.throttle.write_bps_device",
}
_V2_KEYS = {"read_iops": "riops", "write_iops": "wiops", "read_bps": "rbps", "write_bps": "wbps"}


class CgroupGone(NotFound):
    """The cgroup (or its rule file) is not there: removed, or the controller is off."""


@dataclass(frozen=True)
class IoLimits:
    """What one cgroup may do on one device; 0 = unlimited."""

    read_iops: int = 0
    write_iops: int = 0
    read_bps: int = 0
    write_bps: int = 0

    @property
    def unlimited(self) -> bool:
        return not (self.read_iops or self.write_iops or self.read_bps or self.write_bps)

    @classmethod
    def from_spec(cls, spec: QosSpec) -> IoLimits:
        return cls(
            spec.max_read_iops,
            spec.max_write_iops,
            spec.max_read_mbps * BYTES_PER_MB,
            spec.max_write_mbps * BYTES_PER_MB,
        )


@dataclass(frozen=True)
class IopsCap:
    """A temporary ceiling the squeeze loop puts on a bursting volume; 0 = none."""

    read_iops: int = 0
    write_iops: int = 0


def _lower(limit: int, cap: int) -> int:
    if not cap:
        return limit
    return min(limit, cap) if limit else cap


def effective_limits(spec: QosSpec, cap: IopsCap | None) -> IoLimits:
    """The volume's tier limits, lowered by a squeeze cap if there is one."""
    limits = IoLimits.from_spec(spec)
    if cap is None:
        return limits
    return IoLimits(
        _lower(limits.read_iops, cap.read_iops),
        _lower(limits.write_iops, cap.write_iops),
        limits.read_bps,
        limits.write_bps,
    )


def check_device(device: object) -> Device:
    """(major, minor) as two non-negative ints; InvalidSpec otherwise."""
    if (
        not isinstance(device, (tuple, list))
        or len(device) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in device)
    ):
        raise InvalidSpec(f"device must be (major, minor) integers, got {device!r}")
    return int(device[0]), int(device[1])


def _write(path: str, line: str) -> None:
    """One write() per rule, as the kernel parses each write separately.

    O_TRUNC is ignored by cgroupfs but makes a fake tree hold the last rule written.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    except FileNotFoundError:
        raise CgroupGone(f"{path} is missing (cgroup gone or controller not enabled)") from None
    try:
        os.write(fd, line.encode())
    except OSError as e:
        if e.errno == errno.ENODEV:
            raise NotFound(f"{path}: no block device for rule {line.strip()!r}") from None
        if e.errno == errno.ENOENT:
            raise CgroupGone(f"{path} vanished while writing") from None
        if e.errno == errno.EINVAL:
            raise InvalidSpec(f"{path} refused rule {line.strip()!r}") from None
        raise
    finally:
        os.close(fd)


# --- cgroup v2 -------------------------------------------------------------------------


def format_io_max(device: Device, limits: IoLimits) -> str:
    fields = []
    for attr, key in _V2_KEYS.items():
        value = getattr(limits, attr)
        fields.append(f"{key}={value if value else 'max'}")
    return f"{device[0]}:{device[1]} " + " ".join(fields)


def write_v2(cgroup_dir: str, device: Device, limits: IoLimits) -> None:
    """Set (or, with all-unlimited values, delete) the device's line in io.max. The whole
    line each time: any write restarts the throttling slices of the device anyway."""
    _write(os.path.join(cgroup_dir, V2_IO_MAX), format_io_max(device, limits) + "\n")


def read_v2(cgroup_dir: str) -> dict[Device, IoLimits]:
    """io.max as the kernel shows it: one line per device that has a limit."""
    out: dict[Device, IoLimits] = {}
    with open(os.path.join(cgroup_dir, V2_IO_MAX), encoding="ascii") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            major, minor = (int(x) for x in parts[0].split(":"))
            values = dict(p.split("=", 1) for p in parts[1:])
            kwargs = {}
            for attr, key in _V2_KEYS.items():
                raw = values.get(key, "max")
                kwargs[attr] = 0 if raw == "max" else int(raw)
            out[(major, minor)] = IoLimits(**kwargs)
    return out


# --- cgroup v1 -------------------------------------------------------------------------


def _changed(limits: IoLimits, previous: IoLimits | None) -> list[str]:
    """The fields to write: all without a previous value, else only those that differ."""
    attrs = list(_V2_KEYS)
    if previous is None:
        return attrs
    return [a for a in attrs if getattr(limits, a) != getattr(previous, a)]


def write_v1(
    cgroup_dir: str, device: Device, limits: IoLimits, previous: IoLimits | None = None
) -> None:
    """Set the blkio.throttle rules of one device (all four, or with `previous` only those
    that change: each write restarts the device's throttling slices); 0 deletes a rule."""
    for attr in _changed(limits, previous):
        value = getattr(limits, attr)
        _write(os.path.join(cgroup_dir, V1_FILES[attr]), f"{device[0]}:{device[1]} {value}\n")


def read_v1(cgroup_dir: str, device: Device) -> IoLimits:
    kwargs = {}
    wanted = f"{device[0]}:{device[1]}"
    for attr, name in V1_FILES.items():
        kwargs[attr] = 0
        with open(os.path.join(cgroup_dir, name), encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[0] == wanted:
                    kwargs[attr] = int(parts[1])
    return IoLimits(**kwargs)
