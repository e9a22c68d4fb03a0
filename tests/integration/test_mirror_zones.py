"""Mirrored volume across zones (network namespaces), with faults injected.

Each scenario ends with: no acknowledged write lost (checked through the
device and on every replica's file) and identical replica checksums.
Needs root: fails, never skips, without it.
"""

from __future__ import annotations

import mmap
import os
import signal
import time

import pytest

from engine import command
from mirror.frontend import Frontend
from mirror.spec import FrontendTuning, ReplicaAddr, ReplicaState
from mirror.testkit import Cluster, ReplicaProc, VerifiedWriter, release_tree

SIZE = 64 * 1024 * 1024
BLOCKS = 8192  # the first 32 MiB are written by the checker
PORT = 7400
TUNING = FrontendTuning(io_timeout_s=1.5, reconnect_interval_s=0.3, node_safety=True)


def test_runs_as_root():
    assert os.geteuid() == 0, "integration tests need root (loop devices, FUSE, namespaces)"


@pytest.fixture
def cluster(tmp_path):
    made: list[Cluster] = []

    def make(**kw) -> Cluster:
        c = Cluster(str(tmp_path), port=PORT, tuning=TUNING, **kw)
        made.append(c)
        return c

    yield make
    try:
        for c in made:
            c.down()
    finally:
        release_tree(str(tmp_path))  # whatever a failed stop left: mounts, loop devices


def test_mirrored_device_basic_and_fallocate(cluster):
    c = cluster()
    dev = c.up()
    with open(f"/sys/block/{os.path.basename(dev)}/loop/dio") as f:
        assert f.read().strip() == "1", "loop device must do direct I/O on the FUSE file"
    with open(f"/sys/block/{os.path.basename(dev)}/size") as f:
        assert int(f.read()) * 512 == SIZE
    w = VerifiedWriter(dev, BLOCKS).start()
    w.wait_writes(2000)
    w.stop()
    # discard through the loop device is replicated (FUSE fallocate punch hole)
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 1 << 20)
        buf.write(b"\xaa" * (1 << 20))
        os.pwrite(fd, buf, 48 << 20)
    finally:
        os.close(fd)
    command.run(["blkdiscard", "-o", str(48 << 20), "-l", str(1 << 20), dev])
    c.check(w)
    for r in c.replicas:  # the discard reached every replica: the range reads back as zeros
        with open(r.data_path(c.volume_id), "rb") as f:
            f.seek(48 << 20)
            assert f.read(1 << 20) == bytes(1 << 20)


def test_discard_and_zeroing_larger_than_a_write_are_mirrored(cluster):
    """mkfs zeroes and discards in ranges of tens of MiB (one FUSE fallocate each), far
    beyond the largest write; they reach every replica and the data path stays up."""
    c = cluster()
    dev = c.up()
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 8 << 20)
        buf.write(b"\xaa" * (8 << 20))
        for off in range(0, SIZE, 8 << 20):
            os.pwrite(fd, buf, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    command.run(["blkdiscard", "-z", "-o", "0", "-l", str(32 << 20), dev])  # ZERO_RANGE
    command.run(["blkdiscard", "-o", str(32 << 20), "-l", str(32 << 20), dev])  # PUNCH_HOLE
    for r in c.replicas:
        with open(r.data_path(c.volume_id), "rb") as f:
            assert f.read(SIZE) == bytes(SIZE)
    w = VerifiedWriter(dev, 1024).start()  # and the volume still serves
    w.wait_writes(300)
    w.stop()
    c.check(w)


def test_replica_sigkill_mid_write_then_resync(cluster):
    c = cluster()
    dev = c.up()
    w = VerifiedWriter(dev, BLOCKS).start()
    w.wait_writes(500)
    c.replicas[1].kill()
    w.wait_writes(1500)  # keeps serving degraded
    assert c.state("r2") == ReplicaState.OUT_OF_SYNC
    c.replicas[1].start()
    c.wait_state("r2", ReplicaState.IN_SYNC)
    w.wait_writes(500)
    w.stop()
    c.check(w)


def test_zone_cut_and_heal(cluster):
    c = cluster()
    dev = c.up()
    w = VerifiedWriter(dev, BLOCKS).start()
    w.wait_writes(500)
    c.topo.cut(2)
    w.wait_writes(1000, timeout_s=30)  # after the io timeout the cut zone is dropped
    assert c.state("r2") != ReplicaState.IN_SYNC
    c.topo.heal(2)
    c.wait_state("r2", ReplicaState.IN_SYNC, 40)
    w.wait_writes(300)
    w.stop()
    c.check(w)


def test_slow_replica(cluster):
    c = cluster(delay_ms=20)
    dev = c.up()
    w = VerifiedWriter(dev, BLOCKS).start()
    w.wait_writes(300)
    c.replicas[1].signal(signal.SIGUSR1)  # 20 ms per batch from now on: slower, not dropped
    w.wait_writes(300)
    assert c.state("r2") == ReplicaState.IN_SYNC
    c.replicas[1].signal(signal.SIGUSR2)
    w.wait_writes(300)
    w.stop()
    c.check(w)


def test_interrupted_resync_resumes(cluster):
    c = cluster()
    dev = c.up()
    c.replicas[1].kill()
    w = VerifiedWriter(dev, BLOCKS, threads=4, fsync_every=8).start()
    w.wait_writes(3000)
    w.stop()
    # slow the returning replica so the resync is still running when we interrupt it
    c.replicas[1].delay = 30
    c.replicas[1].start()
    c.replicas[1].signal(signal.SIGUSR1)
    assert c.fe is not None
    deadline = time.monotonic() + 20
    while True:
        st = next(r for r in c.fe.status().replicas if r.replica_id == "r2")
        if st.resync_done_bytes > 0:
            break
        assert time.monotonic() < deadline, "resync never started"
        time.sleep(0.02)
    first_total = st.resync_total_bytes
    # interrupt: the frontend dies mid-resync; the new one resumes from the survivors' bitmap
    c.fe.kill_worker()
    c.replicas[1].signal(signal.SIGUSR2)
    c.fe.start_worker()
    deadline = time.monotonic() + 20
    second_total = None
    while second_total is None or c.state("r2") != ReplicaState.IN_SYNC:
        st = next(r for r in c.fe.status().replicas if r.replica_id == "r2")
        if st.resync_total_bytes:
            second_total = st.resync_total_bytes
        if st.state == ReplicaState.IN_SYNC:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    if second_total is not None:
        assert second_total < first_total, "resync restarted from zero"
    c.check(w)


def test_frontend_kill_and_restart_without_app_errors(cluster):
    c = cluster()
    dev = c.up()
    assert c.fe is not None
    w = VerifiedWriter(dev, BLOCKS).start()
    w.wait_writes(500)
    gen0 = c.fe.status().generation
    c.fe.restart_worker()  # SIGKILL; the holder keeps /dev/fuse, the kernel resends
    w.wait_writes(500)
    c.fe.restart_worker()
    w.wait_writes(500)
    assert c.fe.status().generation == gen0 + 2  # each worker fenced the previous one
    w.stop()
    c.check(w)


def test_full_rebuild_onto_new_replica(cluster):
    c = cluster(zones=3)
    # start with r1, r2 only; r3 is the replacement in zone 3
    c.topo.up()
    zones = c.topo
    for i in range(1, 4):
        c.replicas.append(ReplicaProc(os.path.join(c.tmp, f"pool{i}"), zones.ns(f"z{i}"),
                                      zones.zone_ip(i), PORT, c.key).start())
    c.volume_id = "vol-rb"
    addrs = [ReplicaAddr(f"r{i + 1}", r.host, r.port) for i, r in enumerate(c.replicas)]
    c.fe = Frontend("vol-rb", SIZE, addrs[:2], f"sqlite:{c.tmp}/arbiter.db",
                    os.path.join(c.tmp, "fe"), c.key, netns=zones.ns("fe"), tuning=TUNING)
    dev = c.fe.start()
    w = VerifiedWriter(dev, BLOCKS).start()
    w.wait_writes(1000)
    c.replicas[1].kill()
    c.fe.replace_replica("r2", addrs[2])
    w.wait_writes(300)
    c.fe.wait_in_sync(60)
    w.stop()
    c.replicas = [c.replicas[0], c.replicas[2]]
    c.check(w)
