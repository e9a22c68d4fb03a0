"""Shared test helpers: a driver in-process or as a process, and thorough cleanup.

Everything a test makes lives under one temporary root; `cleanup_tree(root)` unmounts
whatever is mounted below it, detaches every loop device whose file is below it, and
removes it, whether the test passed or not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import grpc

from csi.config import GIB, Config
from csi.server import Driver
from engine.loopdev import LoopDevices
from engine.mounts import Mounts
from proto import csi_pb2, csi_pb2_grpc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def file_ids_under(root: str) -> dict[str, tuple[int, int]]:
    """path -> (st_dev, st_ino) of every regular file below root (mounts included)."""
    found: dict[str, tuple[int, int]] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found[f"{dirpath}/{name}"] = (st.st_dev, st.st_ino)
    return found


def cleanup_tree(root: str) -> None:
    """Unmount and detach everything under root, then remove it."""
    release_tree(root)
    shutil.rmtree(os.path.realpath(root), ignore_errors=True)


def release_tree(root: str, keep: tuple[str, ...] = ()) -> None:
    """Unmount and detach everything under root but the mounts at `keep` (what a reboot
    does to a node's kernel state).

    Order matters: a volume's mount holds its loop device, whose file keeps the pool
    busy. Each pass takes off what is free; lazy unmounts are the last resort (a lazily
    unmounted pool hides its files' paths, so their loop devices could not be found).
    Loop devices are recognised by path, and by their files' identity (a device attached
    in a mount namespace that is gone shows its file's path relative to its filesystem).
    """
    root = os.path.realpath(root)
    mounts, loops = Mounts(), LoopDevices()
    files = file_ids_under(root)
    idents = set(files.values())
    names = {os.path.basename(p) for p in files}
    for _ in range(6):
        under = [m for m in mounts.table()
                 if (m.target == root or m.target.startswith(root + "/"))
                 and m.target not in keep]
        for m in sorted(under, key=lambda m: -len(m.target)):
            # a driver killed between a snapshot's freeze and its thaw leaves the
            # filesystem frozen: unmounted so, it stays alive (and frozen) with no mount
            # point left to thaw it, holding its loop device for good
            subprocess.run(["fsfreeze", "--unfreeze", m.target], capture_output=True)
            subprocess.run(["umount", m.target], capture_output=True)
        mounted = {(m.major, m.minor) for m in mounts.table()}
        # identities are asked only for paths that lead nowhere here (relative, or
        # deleted): asking opens the device, which would defer another program's detach
        ours = [d for d in loops.all() if d.backing_file.startswith(root + "/")
                or (os.path.basename(d.backing_file) in names
                    and not os.path.exists(d.backing_file)
                    and loop_backing_id(d.name) in idents)]
        for dev in ours:
            if (dev.major, dev.minor) not in mounted:
                subprocess.run(["losetup", "-d", dev.path], capture_output=True)
        if not under and not ours:
            break
    for m in mounts.table():
        if (m.target == root or m.target.startswith(root + "/")) and m.target not in keep:
            subprocess.run(["umount", "-l", m.target], capture_output=True)


@dataclass
class Stubs:
    channel: grpc.Channel
    identity: csi_pb2_grpc.IdentityStub = field(init=False)
    controller: csi_pb2_grpc.ControllerStub = field(init=False)
    node: csi_pb2_grpc.NodeStub = field(init=False)
    group: csi_pb2_grpc.GroupControllerStub = field(init=False)
    metadata: csi_pb2_grpc.SnapshotMetadataStub = field(init=False)

    def __post_init__(self) -> None:
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.group = csi_pb2_grpc.GroupControllerStub(self.channel)
        self.metadata = csi_pb2_grpc.SnapshotMetadataStub(self.channel)


def make_root(prefix: str = "tdm-test-") -> str:
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def test_config(root: str, **overrides) -> Config:
    base = dict(
        endpoint=f"unix://{root}/csi.sock",
        node_id="node-a",
        state_dir=f"{root}/state",
        zone="zone-a",
        pool_image_bytes=8 * GIB,
        overcommit_ratio=20.0,
        max_volumes_per_node=8,
        default_volume_bytes=64 * 1024 * 1024,
        node_iops_capacity=100_000,  # measured by the tests that need it, not at every start
    )
    base.update(overrides)
    return Config(**base)


class InProcessDriver:
    """The real driver, served on a unix socket from this test process."""

    def __init__(self, config: Config):
        self.config = config
        self.driver = Driver(config)
        self.driver.start()
        self.channel = grpc.insecure_channel(config.endpoint)
        self.stubs = Stubs(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.driver.stop(0)


def loop_backing_id(name: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file behind loop device `name`, asked of losetup (which
    reads it with LOOP_GET_STATUS64): an oracle independent of the driver's own code."""
    proc = subprocess.run(["losetup", "--list", "--json", "-O", "BACK-INO,BACK-MAJ:MIN",
                           f"/dev/{name}"], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    (dev,) = json.loads(proc.stdout)["loopdevices"]
    if dev["back-ino"] is None or dev["back-maj:min"] is None:
        return None  # unbound, or being torn down as we ask
    major, minor = (int(x) for x in dev["back-maj:min"].split(":"))
    return os.makedev(major, minor), int(dev["back-ino"])


def loops_on(path_or_id: str | tuple[int, int], basename: str = "") -> list[str]:
    """The loop devices (/dev/loopN) bound to a file, by its identity, whatever path sysfs
    shows for it. Only devices whose file has the same basename are asked about (asking
    opens the device, which would defer another program's detach for a moment)."""
    if isinstance(path_or_id, str):
        st = os.stat(path_or_id)
        ident, basename = (st.st_dev, st.st_ino), os.path.basename(path_or_id)
    else:
        ident = path_or_id
    found = []
    for dev in LoopDevices().all():
        if os.path.basename(dev.backing_file) == basename and loop_backing_id(dev.name) == ident:
            found.append(dev.path)
    return found


def loops_gone(path_or_id: str | tuple[int, int], basename: str = "",
               timeout_s: float = 5.0) -> list[str]:
    """loops_on, waited for: a detach that another program's brief open of the device
    turned into a deferred one (autoclear) completes once that open ends. Returns what is
    still bound after timeout_s (empty: everything was released)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = loops_on(path_or_id, basename)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


class DriverProcess:
    """`python -m csi.server` as a child process, for kill -9 and restart tests.

    `wrap`: a command line the driver runs under (e.g. `unshare -m`: a mount namespace
    of its own, which ends with the process, as a container's does)."""

    def __init__(self, root: str, *, env: dict[str, str] | None = None, extra: list[str] = (),
                 wrap: list[str] = ()):
        self.root = root
        self.endpoint = f"unix://{root}/csi.sock"
        self.env = env or {}
        self.extra = list(extra)
        self.wrap = list(wrap)
        self.proc: subprocess.Popen | None = None
        self.log_path = f"{root}/driver.log"

    def argv(self) -> list[str]:
        return [*self.wrap, sys.executable, "-m", "csi.server", "--endpoint", self.endpoint,
                "--node-id", "node-a", "--zone", "zone-a", "--state-dir", f"{self.root}/state",
                "--pool-size-gib", "8", "--max-volumes-per-node", "8",
                "--node-iops-capacity", "100000", *self.extra]

    def start(self, env: dict[str, str] | None = None, wait: bool = True) -> DriverProcess:
        full_env = {**os.environ, **self.env, **(env or {})}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), cwd=REPO, env=full_env, stdout=log,
                                         stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"driver exited {self.proc.returncode}: {self.log()}")
            try:
                with grpc.insecure_channel(self.endpoint) as ch:
                    rsp = csi_pb2_grpc.IdentityStub(ch).Probe(csi_pb2.ProbeRequest(), timeout=1)
                    if rsp.ready.value:
                        return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"driver not ready in {timeout_s}s: {self.log()}")

    def stubs(self) -> Stubs:
        return Stubs(grpc.insecure_channel(self.endpoint))

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-4000:]
        except FileNotFoundError:
            return ""

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
