"""Backups to object storage in a three-zone cluster (tests/cluster.py), driven through
CSI as the sidecars and the kubelet would.

A real S3 server (Ceph radosgw, tests/rgw.py) runs in a host of the cluster's topology
of its own (namespace x2, 198.18.0.102): the controllers (x1) and the nodes (z1..z3)
reach it over the topology's bridge, as a cluster reaches its object store; the test
reads the bucket through a thread inside that namespace. The targets file every process
gets names the endpoint and the bucket, no credentials and no secretsDir: the only way a
node can hold the credentials is the controller's call over the agent API (mutual TLS),
carrying the secrets of the CreateSnapshot or CreateVolume request.

One cluster and one bucket serve the module; every process logs at DEBUG, and no secret
value may appear in any of their logs.
"""

from __future__ import annotations

import glob
import json
import os
import random
import time
from functools import partial

import grpc
import pytest

from control.records import SNAPSHOT, VOLUME
from control.topology import TOPOLOGY_ZONE_KEY
from engine import snapshots as node_snapshot_records
from engine.backup.jobs import BACKUP_JOB, RESTORE_JOB
from engine.state import SqliteStore
from proto import csi_pb2
from tests import support
from tests.cluster import NodeProc, TandemCluster, wait_for
from tests.conftest import require_root
from tests.integration.helpers import MIB, BlockVolume, create_request
from tests.rgw import Bucket, RadosGateway

SIZE = 64 * MIB
BLOCK = 4096
KEY = "cluster-test-key-" + "c" * 32
WRONG_KEY = "another-test-key-" + "w" * 32
PREFIX = "cluster-b/"


class Setup:
    def __init__(self, cluster: TandemCluster, rgw: RadosGateway, bucket: Bucket,
                 targets_file: str):
        self.cluster, self.rgw, self.bucket = cluster, rgw, bucket
        self.targets_file = targets_file
        self.secrets = {"accessKeyId": rgw.access_key, "secretAccessKey": rgw.secret_key,
                        "encryptionKey": KEY}


@pytest.fixture(scope="module")
def setup(request):
    require_root()
    root = support.make_root("tdm-clb-")
    targets = os.path.join(root, "targets.json")
    args = ("--backup-targets", targets, "--log-level", "DEBUG")
    cluster = TandemCluster(root, extra_hosts=2, node_args=args, controller_args=args)
    rgw = RadosGateway(root, netns=cluster.topo.ns("x2"), host=cluster.topo.host_ip(2))
    bucket_name = f"tdm-{os.urandom(6).hex()}"
    with open(targets, "w") as f:
        json.dump({"targets": {"offsite": {"endpoint": rgw.endpoint, "bucket": bucket_name,
                                           "prefix": PREFIX}}}, f)
    failed = request.session.testsfailed
    try:
        cluster.up()
        rgw.start()
        bucket = Bucket(rgw, name=bucket_name)
        yield Setup(cluster, rgw, bucket, targets)
    finally:
        if request.session.testsfailed > failed:
            print(cluster.logs())
        rgw.close()
        cluster.down()
        support.cleanup_tree(root)


def in_zone(name: str, zone: int, **kw) -> csi_pb2.CreateVolumeRequest:
    req = create_request(name, size=SIZE, block=True, **kw)
    req.accessibility_requirements.requisite.append(
        csi_pb2.Topology(segments={TOPOLOGY_ZONE_KEY: f"zone-{zone}"}))
    return req


def from_backup(name: str, zone: int, snapshot_id: str, secrets: dict):
    return in_zone(name, zone, secrets=secrets, volume_content_source=csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id)))


def snapshot_request(name: str, volume_id: str, secrets: dict):
    return csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=volume_id,
                                         parameters={"backupTarget": "offsite"},
                                         secrets=secrets)


def until_ready(call, timeout_s: float = 60.0) -> csi_pb2.Snapshot:
    """CreateSnapshot repeated until ready_to_use, as the snapshotter does."""
    deadline = time.monotonic() + timeout_s
    while True:
        snap = call().snapshot
        if snap.ready_to_use:
            return snap
        assert time.monotonic() < deadline, "not uploaded in time"
        time.sleep(0.1)


def until_made(call, timeout_s: float = 60.0) -> csi_pb2.Volume:
    """CreateVolume repeated while ABORTED (a restore running), as the provisioner does."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call().volume
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def error_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def node_jobs(node: NodeProc, kind: str) -> dict[str, dict]:
    """The records of a kind (backup or restore jobs, snapshots) a node's own store
    holds (read beside the process, or after it died)."""
    store = SqliteStore(os.path.join(node.state_dir, "state.sqlite"))
    try:
        return dict(store.list(kind))
    finally:
        store.close()


def node_snapshots(node: NodeProc) -> list[str]:
    path = os.path.join(node.pool_dir, "snapshots")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def retried(call, timeout_s: float = 60.0):
    """As a sidecar: repeat while the answer says "try again" (a node away, a lock)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED) \
                    or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def assert_no_secret_stored(setup: Setup) -> None:
    """Neither the cluster's records (etcd) nor any node's own store (its SQLite files,
    write-ahead log included) hold a secret value."""
    values = [v.encode() for v in (*setup.secrets.values(), WRONG_KEY)]
    records = json.dumps([got.value for _, got in setup.cluster.store().list()]).encode()
    assert not [v for v in values if v in records]
    for node in setup.cluster.nodes:
        for path in glob.glob(os.path.join(node.state_dir, "state.sqlite*")):
            with open(path, "rb") as f:
                data = f.read()
            assert not [v for v in values if v in data], path


def whole_log(proc) -> str:
    with open(proc.log_path, encoding="utf-8", errors="replace") as f:
        return f.read()


def test_backup_in_one_zone_restores_in_another(setup, test_root):
    cluster, bucket, secrets = setup.cluster, setup.bucket, setup.secrets
    ctl0, ctl1 = (c.stubs().controller for c in cluster.controllers)
    z1, z2, z3 = cluster.nodes

    # a volume in zone 1 with known data: a run of 8 MiB and scattered blocks
    vol = ctl0.CreateVolume(in_zone("src", 1), timeout=30).volume
    assert cluster.node_of(vol) is z1
    src = BlockVolume(z1.stubs(), test_root, vol.volume_id, timeout=60)
    rng = random.Random(7)
    src.write(8 * MIB, rng.randbytes(8 * MIB))
    for b in rng.sample(range(SIZE // BLOCK), 64):
        src.write(b * BLOCK, rng.randbytes(BLOCK))
    source = src.digest()

    # the backup: taken and uploaded by zone 1's node; the first answer comes at once
    make = partial(ctl0.CreateSnapshot, snapshot_request("b1", vol.volume_id, secrets),
                   timeout=30)
    first = make().snapshot
    assert first.snapshot_id.startswith("bkp:offsite:") and not first.ready_to_use
    snap = until_ready(make)
    assert (snap.snapshot_id, snap.source_volume_id, snap.size_bytes) == (
        first.snapshot_id, vol.volume_id, SIZE)
    backup_id = snap.snapshot_id.rsplit(":", 1)[1]
    assert f"{PREFIX}backups/{backup_id}" in bucket.objects()
    (job,) = node_jobs(z1, BACKUP_JOB).values()
    assert job["phase"] == "done" and job["backup_id"] == backup_id
    assert "accessKeyId" not in json.dumps(job) and secrets["secretAccessKey"] \
        not in json.dumps(job)
    assert not node_jobs(z2, BACKUP_JOB) and not node_jobs(z3, BACKUP_JOB)
    src.release()

    # the other controller knows it, by ID and in the full listing
    listed = ctl1.ListSnapshots(csi_pb2.ListSnapshotsRequest(
        snapshot_id=snap.snapshot_id, secrets=secrets), timeout=30).entries
    assert [(e.snapshot.snapshot_id, e.snapshot.ready_to_use, e.snapshot.source_volume_id)
            for e in listed] == [(snap.snapshot_id, True, vol.volume_id)]
    every = ctl1.ListSnapshots(csi_pb2.ListSnapshotsRequest(), timeout=30).entries
    assert snap.snapshot_id in {e.snapshot.snapshot_id for e in every}

    # restored in zone 2 through the other controller, by zone 2's node
    restore = partial(ctl1.CreateVolume, from_backup("r1", 2, snap.snapshot_id, secrets),
                      timeout=30)
    restored = until_made(restore)
    assert cluster.node_of(restored) is z2
    assert restore().volume.volume_id == restored.volume_id  # idempotent
    assert node_jobs(z2, RESTORE_JOB)[restored.volume_id]["phase"] == "done"
    copy = BlockVolume(z2.stubs(), test_root, restored.volume_id, timeout=60)
    assert copy.digest() == source
    copy.release()

    # an error on the node comes back with its code: a damaged pack fails the restore in
    # zone 3 with DATA_LOSS naming it (the controller read only the intact manifest)
    (pack_key,) = bucket.packs()
    intact = bucket.get(pack_key)
    damaged = bytearray(intact)
    damaged[len(damaged) // 2] ^= 0x40
    bucket.put(pack_key, bytes(damaged))
    damaged_restore = partial(ctl0.CreateVolume, from_backup("r2", 3, snap.snapshot_id,
                                                             secrets), timeout=30)
    err = error_of(lambda: until_made(damaged_restore))
    assert err.code() == grpc.StatusCode.DATA_LOSS, err.details()
    assert pack_key.rsplit("/", 1)[1] in err.details()
    assert "restore-job vol-" in z3.log() and pack_key.rsplit("/", 1)[1] in z3.log()
    # repaired, the provisioner's next retry restores it
    bucket.put(pack_key, intact)
    again = until_made(damaged_restore)
    assert cluster.node_of(again) is z3
    copy = BlockVolume(z3.stubs(), test_root, again.volume_id, timeout=60)
    assert copy.digest() == source
    copy.release()

    # a wrong key: a restore is refused, and so is an upload (on the node, its error
    # carried back through the agent to the next CreateSnapshot)
    wrong = {**secrets, "encryptionKey": WRONG_KEY}
    err = error_of(lambda: ctl1.CreateVolume(from_backup("r3", 3, snap.snapshot_id, wrong),
                                             timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "refused" in err.details()
    make_wrong = partial(ctl0.CreateSnapshot, snapshot_request("b2", vol.volume_id, wrong),
                         timeout=30)
    err = error_of(lambda: until_ready(make_wrong, timeout_s=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "refused" in err.details()
    wrong_id = next(s for s in cluster.store().list(SNAPSHOT)
                    if s[1].value["name"] == "b2")[1].value["snapshot_id"]
    assert f"backup-job {wrong_id} failed: " in z1.log()  # it failed on zone 1's node

    assert_no_secret_stored(setup)

    # deleted through the second controller: gone from the bucket, and from zone 1's pool
    for snapshot_id in (wrong_id, snap.snapshot_id):
        for _ in range(2):  # idempotent
            ctl1.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(
                snapshot_id=snapshot_id, secrets=secrets), timeout=30)
    assert bucket.packs() == {}
    assert not [k for k in bucket.objects() if "/backups/" in k]
    assert node_snapshots(z1) == [] and not node_jobs(z1, BACKUP_JOB)
    assert not ctl0.ListSnapshots(csi_pb2.ListSnapshotsRequest(
        snapshot_id=snap.snapshot_id, secrets=secrets), timeout=30).entries

    for v in (vol, restored, again):
        ctl0.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id), timeout=30)
    wait_for(lambda: not cluster.store().list(VOLUME), 30, "every volume record gone")
    assert not cluster.store().list(SNAPSHOT)


def test_backups_outlive_their_node(setup, test_root):
    """Zone 1's node dies just after it uploaded a backup, before the controller heard:
    the backup is ready from the bucket alone, restores in zone 2, and an older backup
    deleted meanwhile leaves the bucket at once; its local snapshot and its tombstone go
    once the node is back, without credentials (no secretsDir anywhere)."""
    cluster, bucket, secrets = setup.cluster, setup.bucket, setup.secrets
    ctl0, ctl1 = (c.stubs().controller for c in cluster.controllers)
    z1, z2 = cluster.node(1), cluster.node(2)
    vol = ctl0.CreateVolume(in_zone("kept", 1), timeout=30).volume
    src = BlockVolume(z1.stubs(), test_root, vol.volume_id, timeout=60)
    src.write(4 * MIB, random.Random(8).randbytes(4 * MIB))
    source = src.digest()
    src.release()
    older = until_ready(partial(ctl0.CreateSnapshot, snapshot_request(
        "older", vol.volume_id, secrets), timeout=30))
    make = partial(ctl0.CreateSnapshot, snapshot_request("newer", vol.volume_id, secrets),
                   timeout=30)
    newer_id = make().snapshot.snapshot_id
    wait_for(lambda: node_jobs(z1, BACKUP_JOB).get(newer_id, {}).get("phase") == "done", 30,
             "the node uploaded it")
    z1.kill()
    try:
        wait_for(lambda: z1.node_id not in cluster.registered(), 20, "zone 1's node gone")
        newer = retried(partial(ctl1.CreateSnapshot, snapshot_request(
            "newer", vol.volume_id, secrets), timeout=30)).snapshot
        assert (newer.snapshot_id, newer.ready_to_use) == (newer_id, True)
        # the older one's local snapshot (the base no more) waits for its node
        (_, got), = [s for s in cluster.store().list(SNAPSHOT) if s[0].endswith(
            older.snapshot_id)]
        assert got.value["backup"]["local"] is True
        assert len(node_jobs(z1, node_snapshot_records.KIND)) == 2

        retried(lambda: ctl0.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(
            snapshot_id=older.snapshot_id, secrets=secrets), timeout=30))
        manifests = {k.rsplit("/", 1)[1] for k in bucket.objects() if "/backups/" in k}
        assert manifests == {newer_id.rsplit(":", 1)[1]}
        restored = until_made(partial(ctl1.CreateVolume, from_backup(
            "from-newer", 2, newer_id, secrets), timeout=30))
        assert cluster.node_of(restored) is z2
        copy = BlockVolume(z2.stubs(), test_root, restored.volume_id, timeout=60)
        assert copy.digest() == source
        copy.release()
    finally:
        if not z1.running():
            z1.start()
        cluster.wait_ready()
    # back: the leader finishes the older one's tombstone on its own
    wait_for(lambda: not any(k.endswith(older.snapshot_id)
                             for k, _ in cluster.store().list(SNAPSHOT)), 30,
             "the tombstone finished", lambda: cluster.controller(cluster.wait_leader()).log())
    assert list(node_jobs(z1, node_snapshot_records.KIND)) == [newer_id]
    retried(lambda: ctl1.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(
        snapshot_id=newer_id, secrets=secrets), timeout=30))
    assert bucket.packs() == {} and node_jobs(z1, node_snapshot_records.KIND) == {}
    for v in (vol, restored):
        ctl0.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id), timeout=30)
    wait_for(lambda: not cluster.store().list(VOLUME), 30, "every volume record gone")


def test_a_node_sends_data_only_where_its_own_targets_file_says(setup, test_root):
    """The controller sends each job's target, but a node restores (and uploads) only
    where its own targets file agrees: zone 3's node, restarted with a file whose
    `offsite` has another prefix, refuses the restore (FAILED_PRECONDITION, and the
    intent is rolled back); with the right file again, the same request restores."""
    cluster, secrets = setup.cluster, setup.secrets
    ctl0 = cluster.controller(0).stubs().controller
    z3 = cluster.node(3)
    vol = ctl0.CreateVolume(in_zone("small", 1), timeout=30).volume
    snap = until_ready(partial(ctl0.CreateSnapshot, snapshot_request(
        "small", vol.volume_id, secrets), timeout=30))
    with open(setup.targets_file) as f:
        doc = json.load(f)
    doc["targets"]["offsite"]["prefix"] = "another-cluster"
    other = os.path.join(test_root, "other-targets.json")
    with open(other, "w") as f:
        json.dump(doc, f)
    request = partial(ctl0.CreateVolume, from_backup("on-z3", 3, snap.snapshot_id, secrets),
                      timeout=30)
    z3.stop()
    try:
        z3.start(args=("--backup-targets", other))
        cluster.wait_ready()
        err = error_of(lambda: until_made(request))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert "prefix another-cluster/ on node node-z3" in err.details()
        assert f"prefix {PREFIX} for the controller" in err.details()
        wait_for(lambda: not [k for k, got in cluster.store().list(VOLUME)
                              if got.value["name"] == "on-z3"], 30, "the intent rolled back")
    finally:
        z3.stop()
        z3.start()
        cluster.wait_ready()
    restored = until_made(request)
    assert cluster.node_of(restored) is z3
    for v in (vol, restored):
        ctl0.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id), timeout=30)
    ctl0.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id,
                                                      secrets=secrets), timeout=30)
    assert setup.bucket.packs() == {}


def test_no_secret_reaches_any_log(setup):
    """Run last: every node's and controller's log, at DEBUG, after the whole module."""
    values = [*setup.secrets.values(), WRONG_KEY]
    logs = {p.name: whole_log(p) for p in [*setup.cluster.nodes, *setup.cluster.controllers]}
    assert "engine.backup.jobs: backup " in logs["node-z1"]  # real logs, at DEBUG
    assert all(" DEBUG " in logs[n.name] for n in setup.cluster.nodes)
    assert all("control.backups: backup bkp:offsite:" in logs[c.name]
               for c in setup.cluster.controllers[:1])
    for name, text in logs.items():
        for value in values:
            assert value not in text, f"a secret in {name}'s log"
