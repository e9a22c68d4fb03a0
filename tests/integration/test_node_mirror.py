"""The node's side of mirrored volumes, for real: replica services serving pool files,
frontends under etcd leases with the arbiter in etcd, adoption by a restarted agent,
fencing by a newer generation, and self-fencing when neither the lease nor the replicas
vouch for the frontend any more.

Everything runs on loopback in this namespace (two "nodes" are two state dirs and two
replica ports); partitions between zones are the cluster tests' business.
"""

from __future__ import annotations

import mmap
import os
import signal
import time

import pytest

from control.node_mirror import ClusterAccess, FrontendHost, ReplicaHost, _read_pid
from control.store_arbiter import StoreArbiter
from control.stores import StoreSpec, open_store
from mirror import auth
from mirror.arbiter import VolumeRecord
from mirror.client import ReplicaClient
from mirror.spec import FrontendTuning, ReplicaAddr
from mirror.testkit import VerifiedWriter
from tests.conftest import etcd_namespace
from tests.etcd_cluster import EtcdCluster, free_ports

MIB = 1024 * 1024
SIZE = 64 * MIB


@pytest.fixture
def lab(test_root):
    etcd = EtcdCluster(test_root).start()
    namespace = etcd_namespace()
    store = open_store(StoreSpec(etcd.url, namespace=namespace))
    key_path = f"{test_root}/mirror.key"
    with open(key_path, "wb") as f:
        f.write(os.urandom(24).hex().encode())
    ports = free_ports(2)
    hosts = [ReplicaHost(f"{test_root}/node{i}/replicas", f"127.0.0.1:{ports[i]}", key_path)
             for i in (0, 1)]
    frontends: list[FrontendHost] = []

    def frontend_host(node: str = "node0", ttl: int = 4, margin: float = 2.0) -> FrontendHost:
        fh = FrontendHost(f"{test_root}/{node}/frontends", key_path, node,
                          ClusterAccess(etcd.url, store_namespace=namespace, lease_ttl_s=ttl,
                                        fence_margin_s=margin),
                          tuning=FrontendTuning(io_timeout_s=2.0, node_safety=False))
        frontends.append(fh)
        return fh

    try:
        for h in hosts:
            h.start()
        yield etcd, store, hosts, frontend_host
    finally:
        for fh in frontends:
            for vid in list(os.listdir(fh.frontends_dir)) if os.path.isdir(
                    fh.frontends_dir) else []:
                try:
                    fh.stop(vid)
                except Exception:  # noqa: BLE001 - clean up everything we can
                    pass
        for h in hosts:
            h.stop()
        store.close()
        etcd.close()


def make_volume(test_root: str, store, hosts: list[ReplicaHost], volume_id: str,
                generation: int) -> list[ReplicaAddr]:
    """What the controller and the replicas' nodes do for a new mirrored volume."""
    addrs = []
    for i, h in enumerate(hosts):
        data = f"{test_root}/node{i}/pool-{volume_id}.img"
        with open(data, "wb") as f:
            f.truncate(SIZE)
        h.create(volume_id, SIZE, data)
        host, _, port = h.listen.rpartition(":")
        addrs.append(ReplicaAddr(f"node{i}", host, int(port)))
    arbiter = StoreArbiter(store)
    assert arbiter.compare_and_set(VolumeRecord(
        volume_id, generation, "published:node0",
        {a.replica_id: "in_sync" for a in addrs}), 0) is not None
    return addrs


def replica_files(test_root: str, volume_id: str) -> list[str]:
    return [f"{test_root}/node{i}/pool-{volume_id}.img" for i in (0, 1)]


def lost_blocks(writer: VerifiedWriter, test_root: str, volume_id: str) -> list[list[int]]:
    """Per replica, acknowledged blocks it does not hold (all empty: nothing lost)."""
    return [writer.verify(path) for path in replica_files(test_root, volume_id)]


def write_fails(dev: str) -> bool:
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    try:
        os.pwrite(fd, buf, 0)
        os.fsync(fd)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def test_frontend_serves_is_adopted_and_is_fenced_by_a_newer_generation(lab, test_root):
    etcd, store, hosts, frontend_host = lab
    addrs = make_volume(test_root, store, hosts, "vol-m1", generation=5)
    fh = frontend_host()
    dev = fh.ensure("vol-m1", SIZE, addrs, generation=5, min_in_sync=1)
    writer = VerifiedWriter(dev, blocks=1024, threads=2).start()
    writer.wait_writes(200)
    lease = store.get("frontend/vol-m1")
    assert lease is not None and lease.value["state"] == "serving"
    assert lease.value["generation"] == 5

    # the agent restarts (a new FrontendHost object: no memory of what it started)
    again = frontend_host()
    assert again.adopt_all() == ["vol-m1"]
    assert again.device("vol-m1") == dev
    writer.wait_writes(200)  # the data path never stopped
    writer.stop()
    assert writer.errors == []
    assert lost_blocks(writer, test_root, "vol-m1") == [[], []]

    # ControllerPublish to another node: generation 6 in the arbiter, then on the replicas
    arbiter = StoreArbiter(store)
    rec = arbiter.get("vol-m1")
    assert arbiter.compare_and_set(VolumeRecord("vol-m1", 6, "published:node1",
                                                rec.replicas), rec.version)
    for h in hosts:
        assert h.fence("vol-m1", 6) == 6
    assert write_fails(dev)  # the old frontend can never write again
    assert again.status("vol-m1").fenced
    again.stop("vol-m1")


def read_fails(dev: str) -> bool:
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    try:
        os.preadv(fd, [buf], 0)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_frontend_cut_off_from_etcd_and_a_replica_fences_itself_in_time(lab, test_root):
    """etcd answers nothing and one of the two replicas falls silent (SIGSTOP: its
    connection stays open, as across a partition) while the frontend is idle. Serving on
    the replicas' word needs both here (min_in_sync 1 of 2: a takeover needs only one),
    and the silent one's probes go unanswered: the frontend stops serving, reads
    included, before etcd could expire its lease. (A frontend that only looked at its
    connections would serve reads from the other replica for ever.)"""
    etcd, store, hosts, frontend_host = lab
    addrs = make_volume(test_root, store, hosts, "vol-m2", generation=1)
    fh = frontend_host(ttl=6, margin=2.0)  # renewals every 1 s: a 2 s proof window
    dev = fh.ensure("vol-m2", SIZE, addrs, generation=1, min_in_sync=1)
    writer = VerifiedWriter(dev, blocks=512, threads=2).start()
    writer.wait_writes(100)
    writer.stop()
    assert writer.errors == []
    silent = _read_pid(hosts[1].pid_path)
    cut = time.monotonic()
    etcd.pause(0)  # no renewal gets through: etcd's expiry is >= cut - 1 s + TTL
    os.kill(silent, signal.SIGSTOP)
    try:
        while not read_fails(dev) and time.monotonic() < cut + 15:
            time.sleep(0.05)
        fenced_after = time.monotonic() - cut
    finally:
        os.kill(silent, signal.SIGCONT)
        etcd.resume(0)
    assert fenced_after < 6.0 - 1.0, f"still serving {fenced_after:.1f} s after the cut"
    assert fh.status("vol-m2").fenced
    assert lost_blocks(writer, test_root, "vol-m2") == [[], []]  # nothing acked was lost
    fh.stop("vol-m2")


def test_a_clean_stop_says_stopped(lab, test_root):
    etcd, store, hosts, frontend_host = lab
    addrs = make_volume(test_root, store, hosts, "vol-m3", generation=1)
    fh = frontend_host()
    dev = fh.ensure("vol-m3", SIZE, addrs, generation=1, min_in_sync=1)
    writer = VerifiedWriter(dev, blocks=2048, threads=2).start()
    writer.wait_writes(200)  # writes all over the volume: the activity logs name regions
    writer.stop()
    fh.stop("vol-m3")
    got = store.get("frontend/vol-m3")
    assert got is not None and got.value["state"] == "stopped"
    assert not os.path.exists(fh._dir("vol-m3"))
    # a clean stop empties every replica's activity log (nothing for a next start to
    # treat as suspect) and leaves no region dirty: every acknowledged block is on both
    key = auth.load_key(f"{test_root}/mirror.key")
    for a in addrs:
        with ReplicaClient((a.host, a.port), key) as c:
            c.open("vol-m3", 2)
            dirty, activity = c.maps()
            assert not any(activity), f"{a.replica_id}: activity log not emptied"
            assert not any(dirty), f"{a.replica_id}: regions left dirty"
    assert lost_blocks(writer, test_root, "vol-m3") == [[], []]
