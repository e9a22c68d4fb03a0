"""Helpers for the conformance suite: capabilities, status checks, and the kernel's view.

The kernel's view (mounts, loop devices) is read here directly from /proc and /sys,
not through the driver's own parsers, so a bug there cannot hide a bug in the driver.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from dataclasses import dataclass

import grpc

from proto import csi_pb2

MIB = 1024 * 1024
GIB = 1024 * MIB
SMALL = 64 * MIB  # the suite's usual volume
XFS_SMALL = 300 * MIB  # mkfs.xfs refuses anything smaller
RPC_TIMEOUT_S = 60

Mode = csi_pb2.VolumeCapability.AccessMode
SNW = Mode.SINGLE_NODE_WRITER
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
OUT_OF_RANGE = grpc.StatusCode.OUT_OF_RANGE
ABORTED = grpc.StatusCode.ABORTED
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED

# IDs the sanity suite sends (DefaultIDGenerator) plus ones that would be dangerous
# if an ID ever became a path.
FAKE_VOLUME_ID = "fake-vol-id-0123456789"
FAKE_NODE_ID = "fake-node-id-0123456789"
UNKNOWN_VOLUME_IDS = [
    "fake-vol-id",
    FAKE_VOLUME_ID,
    "non-existing-volume-id",
    "vol-" + "0" * 32,  # our own shape, but never made
    "../../../../etc",
    "vol-../x",
]


def capability(access_type: str = "mount", mode: int = SNW, fs_type: str = "",
               mount_flags: tuple[str, ...] = ()) -> csi_pb2.VolumeCapability:
    access = csi_pb2.VolumeCapability.AccessMode(mode=mode)
    if access_type == "block":
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                        access_mode=access)
    assert access_type == "mount", access_type
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type,
                                                   mount_flags=list(mount_flags)),
        access_mode=access)


def rpc_name(method) -> str:
    name = getattr(method, "_method", b"?")
    return (name.decode() if isinstance(name, bytes) else str(name)).rsplit("/", 1)[-1]


def call(method, request):
    """(status code, response or None, details): never raises for an RPC error."""
    try:
        return OK, method(request, timeout=RPC_TIMEOUT_S), ""
    except grpc.RpcError as e:
        return e.code(), None, e.details()


def expect_code(method, request, code: grpc.StatusCode):
    got, rsp, details = call(method, request)
    assert got == code, (
        f"{rpc_name(method)}: expected {code.name}, got {got.name}: {details}\n"
        f"request: {request}")
    return rsp


def expect_one_of(method, request, codes: set[grpc.StatusCode]):
    got, _, details = call(method, request)
    assert got in codes, (
        f"{rpc_name(method)}: expected one of {sorted(c.name for c in codes)}, "
        f"got {got.name}: {details}\nrequest: {request}")
    return got


def ok(method, request, repeat: int = 2):
    """Call `repeat` times; every answer must be OK and the same. Returns the first."""
    first = expect_code(method, request, OK)
    for _ in range(repeat - 1):
        again = expect_code(method, request, OK)
        assert again == first, (
            f"{rpc_name(method)} answered differently when repeated:\n{first}\nvs\n{again}")
    return first


# --- /proc/self/mountinfo ------------------------------------------------------------

def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class Mount:
    dev: tuple[int, int]
    root: str
    target: str
    options: frozenset[str]
    fs_type: str
    source: str


def mountinfo() -> list[Mount]:
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            major, minor = (int(x) for x in a[2].split(":"))
            mounts.append(Mount((major, minor), _unescape(a[3]), _unescape(a[4]),
                                frozenset(a[5].split(",")), b[0], _unescape(b[1])))
    return mounts


def mounts_at(target: str) -> list[Mount]:
    return [m for m in mountinfo() if m.target == target]


def mounts_under(root: str) -> list[Mount]:
    return [m for m in mountinfo() if m.target == root or m.target.startswith(root + "/")]


# --- loop devices from /sys ----------------------------------------------------------

@dataclass(frozen=True)
class Loop:
    name: str
    dev: tuple[int, int]
    backing_file: str
    read_only: bool
    size_bytes: int

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"


def loops() -> list[Loop]:
    found = []
    for name in os.listdir("/sys/block"):
        if not name.startswith("loop"):
            continue
        base = f"/sys/block/{name}"
        try:
            with open(f"{base}/loop/backing_file") as f:
                backing = f.read().strip().removesuffix(" (deleted)")
            with open(f"{base}/dev") as f:
                major, minor = (int(x) for x in f.read().split(":"))
            with open(f"{base}/ro") as f:
                ro = f.read().strip() == "1"
            with open(f"{base}/size") as f:
                size = int(f.read()) * 512
        except (FileNotFoundError, ValueError):
            continue
        except OSError as e:  # detached by another process as we read it: not bound
            if e.errno in (errno.ENODEV, errno.ENXIO):
                continue
            raise
        found.append(Loop(name, (major, minor), backing, ro, size))
    return found


def loops_under(root: str) -> list[Loop]:
    return [d for d in loops() if d.backing_file.startswith(root.rstrip("/") + "/")]


def settled(probe, timeout_s: float = 3.0):
    """probe() once it is empty, or its last answer after timeout_s.

    The kernel defers a loop device's detach while something (udev's probe, typically)
    still holds it open, until that opener closes it: give that a moment.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if not value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def loops_left_under(root: str) -> list[Loop]:
    return settled(lambda: loops_under(root))


def block_device_size(path: str) -> int:
    BLKGETSIZE64 = 0x80081272
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    finally:
        os.close(fd)
    return struct.unpack("Q", buf)[0]


def fs_size(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize
