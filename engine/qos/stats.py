"""I/O counters from the kernel: per cgroup and device (for metrics, the CLI and the squeeze
loop), and the device's own queue statistics (to tell a starved volume from an idle one).

Counters only ever grow, except when a cgroup below the one read is removed; rates()
clamps such drops to zero rather than reporting negative IOPS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from engine.qos.limits import Device

V1_IOS = "blkio.throttle.io_serviced"
V1_BYTES = "blkio.throttle.io_service_bytes"
V2_STAT = "io.stat"


@dataclass(frozen=True)
class IoCounters:
    """Completed I/O since the cgroup (or device) appeared."""

    read_ios: int = 0
    write_ios: int = 0
    read_bytes: int = 0
    write_bytes: int = 0

    def __add__(self, other: IoCounters) -> IoCounters:
        return IoCounters(
            self.read_ios + other.read_ios,
            self.write_ios + other.write_ios,
            self.read_bytes + other.read_bytes,
            self.write_bytes + other.write_bytes,
        )


@dataclass(frozen=True)
class IoRates:
    read_iops: float = 0.0
    write_iops: float = 0.0
    read_bytes_per_s: float = 0.0
    write_bytes_per_s: float = 0.0


@dataclass(frozen=True)
class DeviceCounters:
    """From /sys/dev/block/M:m/stat: ticks are milliseconds summed over every request in
    flight, so their growth per millisecond is the average queue occupancy."""

    read_ios: int = 0
    write_ios: int = 0
    read_ticks_ms: int = 0
    write_ticks_ms: int = 0


def rates(before: IoCounters, after: IoCounters, interval_s: float) -> IoRates:
    if interval_s <= 0:
        return IoRates()

    def per_s(a: int, b: int) -> float:
        return max(0, b - a) / interval_s

    return IoRates(
        per_s(before.read_ios, after.read_ios),
        per_s(before.write_ios, after.write_ios),
        per_s(before.read_bytes, after.read_bytes),
        per_s(before.write_bytes, after.write_bytes),
    )


def inflight(
    before: DeviceCounters, after: DeviceCounters, interval_s: float
) -> tuple[float, float]:
    """Average (read, write) requests in flight over the interval."""
    if interval_s <= 0:
        return 0.0, 0.0
    ms = interval_s * 1000.0
    return (
        max(0, after.read_ticks_ms - before.read_ticks_ms) / ms,
        max(0, after.write_ticks_ms - before.write_ticks_ms) / ms,
    )


def _v1_device_ops(path: str, device: Device) -> tuple[int, int]:
    """(Read, Write) for one device from a v1 io_serviced / io_service_bytes file."""
    wanted = f"{device[0]}:{device[1]}"
    read = write = 0
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[0] == wanted:
                    if parts[1] == "Read":
                        read = int(parts[2])
                    elif parts[1] == "Write":
                        write = int(parts[2])
    except FileNotFoundError:
        pass  # the cgroup went away: it holds no I/O any more
    return read, write


def read_v1(cgroup_dir: str, device: Device, recursive: bool) -> IoCounters:
    """blkio.throttle counters of one cgroup (own I/O only, or with its descendants)."""
    suffix = "_recursive" if recursive else ""
    ios = _v1_device_ops(os.path.join(cgroup_dir, V1_IOS + suffix), device)
    byts = _v1_device_ops(os.path.join(cgroup_dir, V1_BYTES + suffix), device)
    return IoCounters(ios[0], ios[1], byts[0], byts[1])


def read_v2(cgroup_dir: str, device: Device) -> IoCounters:
    """io.stat of one cgroup (v2 statistics are hierarchical)."""
    wanted = f"{device[0]}:{device[1]}"
    try:
        with open(os.path.join(cgroup_dir, V2_STAT), encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] == wanted:
                    v = {k: int(x) for k, x in (p.split("=", 1) for p in parts[1:])}
                    return IoCounters(
                        v.get("rios", 0), v.get("wios", 0), v.get("rbytes", 0), v.get("wbytes", 0)
                    )
    except FileNotFoundError:
        pass
    return IoCounters()


def read_cgroup(
    version: int, cgroup_dir: str, device: Device, recursive: bool = True
) -> IoCounters:
    if version == 2:
        return read_v2(cgroup_dir, device)
    return read_v1(cgroup_dir, device, recursive)


def read_device(device: Device, sys_root: str = "/sys") -> DeviceCounters | None:
    """The device's own statistics; None when absent or when its queue keeps none."""
    base = os.path.join(sys_root, "dev", "block", f"{device[0]}:{device[1]}")
    try:
        with open(os.path.join(base, "queue", "iostats"), encoding="ascii") as f:
            if f.read().strip() == "0":
                return None  # all zeros would look like an idle device
    except FileNotFoundError:
        pass  # partitions have no queue/ of their own
    path = os.path.join(base, "stat")
    try:
        with open(path, encoding="ascii") as f:
            fields = [int(x) for x in f.read().split()]
    except (FileNotFoundError, ValueError):
        return None
    if len(fields) < 8:
        return None
    return DeviceCounters(fields[0], fields[4], fields[3], fields[7])
