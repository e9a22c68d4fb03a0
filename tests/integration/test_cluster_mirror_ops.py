"""Every CSI operation on mirrored volumes in a three-zone cluster, as the sidecars and the
kubelet make them: a snapshot under writes (one copy per replica at one write barrier,
checked byte for byte on every replica's node), restores and clones as mirrored and local
volumes (copy-on-write where a copy is, rebuilt in full elsewhere, the progress visible
in the volume's condition), online expansion of a mounted XFS volume, and ModifyVolume's
limits on the consumer node's pod cgroup (cgroup v1 blkio)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import sqlite3
import struct
import zlib

import grpc
import pytest

from control import mirrored
from engine.qos import limits
from mirror.testkit import BLOCK, VerifiedWriter
from proto import csi_pb2
from tests import support
from tests.bench.qos import BLKIO, Lab
from tests.cluster import RETRIED_BY_THE_PROVISIONER, NodeProc, TandemCluster, wait_for
from tests.conftest import require_root

MIB = 1024 * 1024
SIZE = 64 * MIB
POD_UID_KEY = "csi.storage.k8s.io/pod.uid"
Mode = csi_pb2.VolumeCapability.AccessMode


def capability(fs_type: str = "") -> csi_pb2.VolumeCapability:
    mode = Mode(mode=Mode.SINGLE_NODE_WRITER)
    if fs_type:
        return csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type), access_mode=mode)
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                    access_mode=mode)


@pytest.fixture(scope="module")
def env():
    """One cluster for the module; kubelet-like pod cgroups under the nodes' parent."""
    require_root()
    if not os.path.isfile(os.path.join(BLKIO, "blkio.throttle.read_iops_device")):
        pytest.fail(f"{BLKIO} has no blkio throttle files: not the cgroup v1 layout expected")
    root = support.make_root("tdm-clmo-")
    lab = Lab()
    # the slow-replica hook armed (SIGUSR1 on a replica service turns it on): a rebuild
    # slow enough to watch its progress
    cluster = TandemCluster(root, mirror=True, node_args=("--cgroup-parent", lab.parent_name),
                            env={"TANDEM_TEST_REPLICA_DELAY_MS": "250"})
    try:
        cluster.up()
        yield cluster, lab
    finally:
        cluster.down()
        problems = lab.cleanup()
        support.cleanup_tree(root)
        assert not problems, problems


def ctl(cluster: TandemCluster, index: int = 0):
    return cluster.controller(index).stubs().controller


def create(cluster: TandemCluster, name: str, replicas: int, size: int = SIZE,
           fs_type: str = "", zones: tuple[int, ...] = (1, 2, 3),
           source: csi_pb2.VolumeContentSource | None = None,
           parameters: dict[str, str] | None = None) -> csi_pb2.Volume:
    req = csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[capability(fs_type)],
        parameters={"replicas": str(replicas), **(parameters or {})})
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    req.accessibility_requirements.preferred.append(cluster.zone_segments(zones[0]))
    for z in zones:
        req.accessibility_requirements.requisite.append(cluster.zone_segments(z))
    return ctl(cluster).CreateVolume(req).volume


def from_snapshot(snapshot_id: str) -> csi_pb2.VolumeContentSource:
    return csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))


def from_volume(volume_id: str) -> csi_pb2.VolumeContentSource:
    return csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume_id))


class Attached:
    """The attacher's and the kubelet's calls for one volume on one node."""

    def __init__(self, cluster: TandemCluster, vol: csi_pb2.Volume, node: NodeProc,
                 fs_type: str = "", pod_uid: str = ""):
        self.cluster, self.vol, self.node = cluster, vol, node
        self.cap, self.pod_uid = capability(fs_type), pod_uid
        base = os.path.join(cluster.root, f"kubelet-z{node.zone_index}", vol.volume_id)
        self.staging = os.path.join(base, "stg")
        self.target = os.path.join(base, "mnt" if fs_type else "dev")
        os.makedirs(self.staging, exist_ok=True)
        if fs_type:
            os.makedirs(self.target, exist_ok=True)

    def up(self) -> str:
        published = ctl(self.cluster, 1).ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=self.vol.volume_id, node_id=self.node.node_id,
                volume_capability=self.cap, volume_context=self.vol.volume_context))
        self.context = dict(published.publish_context)
        node = self.node.stubs().node
        stage = csi_pb2.NodeStageVolumeRequest(
            volume_id=self.vol.volume_id, staging_target_path=self.staging,
            volume_capability=self.cap, publish_context=self.context,
            volume_context=self.vol.volume_context)
        wait_for(lambda: _retried(node.NodeStageVolume, stage), 30, "NodeStageVolume")
        context = dict(self.vol.volume_context)
        if self.pod_uid:
            context[POD_UID_KEY] = self.pod_uid
        node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=self.vol.volume_id, staging_target_path=self.staging,
            target_path=self.target, volume_capability=self.cap,
            publish_context=self.context, volume_context=context))
        return self.target

    def down(self) -> None:
        node = self.node.stubs().node
        node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=self.vol.volume_id, target_path=self.target))
        node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=self.vol.volume_id, staging_target_path=self.staging))
        ctl(self.cluster).ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
            volume_id=self.vol.volume_id, node_id=self.node.node_id))


def _retried(call, request) -> bool:
    """True once the call succeeds; False on an answer the kubelet retries (ABORTED)."""
    try:
        call(request)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.ABORTED:
            raise
        return False
    return True


def node_of(cluster: TandemCluster, node_id: str) -> NodeProc:
    return next(n for n in cluster.nodes if n.node_id == node_id)


def condition(cluster: TandemCluster, volume_id: str) -> csi_pb2.VolumeCondition:
    return ctl(cluster).ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id)).status.volume_condition


def stored(cluster: TandemCluster, key: str) -> dict:
    got = cluster.store().get(key)
    assert got is not None, key
    return got.value


def replica_file(node: NodeProc, volume_id: str) -> str:
    return os.path.join(node.pool_dir, "replicas", volume_id, "data")


def snapshot_file(node: NodeProc, snapshot_id: str) -> str:
    """The pool file of a snapshot on a node (from the node's own records)."""
    db = sqlite3.connect(f"file:{node.state_dir}/state.sqlite?mode=ro", uri=True)
    try:
        (data,) = db.execute("SELECT data FROM records WHERE kind='snapshot-backing' AND "
                             "key=?", (snapshot_id,)).fetchone()
    finally:
        db.close()
    name = json.loads(data)["pool_name"]
    for directory, subdirs, files in os.walk(node.pool_dir):
        for f in files:  # XFS: snapshots/NAME.img
            if f.startswith(name):
                return os.path.join(directory, f)
        if name in subdirs:  # btrfs: a subvolume NAME holding data.img
            return os.path.join(directory, name, "data.img")
    raise AssertionError(f"no pool file of snapshot {snapshot_id} ({name}) on {node.node_id}")


def digest(path: str, size: int = SIZE) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(left, 4 * MIB))
            assert chunk, f"{path} is shorter than {size} bytes"
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def stale_blocks(path: str, acked_before: dict[int, bytes]) -> list[int]:
    """Blocks of an image older than what was acknowledged before it was taken, or torn
    (each verified block says its index and sequence, and carries a CRC)."""
    bad = []
    with open(path, "rb") as f:
        for blk, data in acked_before.items():
            f.seek(blk * BLOCK)
            got = f.read(BLOCK)
            index, seq = struct.unpack_from("<QQ", got)
            if (index != blk or zlib.crc32(got[:-4]) != struct.unpack_from("<I", got, BLOCK - 4)[0]
                    or seq < struct.unpack_from("<QQ", data)[1]):
                bad.append(blk)
    return bad


def frontend_log(a: Attached) -> str:
    path = os.path.join(a.node.state_dir, "frontends", a.vol.volume_id, "worker.log")
    try:
        with open(path, errors="replace") as f:
            return f.read()[-4000:]
    except FileNotFoundError:
        return f"(no {path})"


def replica_service_pid(node: NodeProc) -> int:
    with open(os.path.join(node.pool_dir, "replicas", "service.pid")) as f:
        return int(f.read().strip())


@contextlib.contextmanager
def slowed(node: NodeProc):
    """The node's replica service answers every batch late (its test hook)."""
    os.kill(replica_service_pid(node), signal.SIGUSR1)
    try:
        yield
    finally:
        os.kill(replica_service_pid(node), signal.SIGUSR2)


def delete_volume(cluster: TandemCluster, volume_id: str) -> None:
    def gone() -> bool:
        try:
            ctl(cluster).DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
        except grpc.RpcError as e:  # a replica its frontend just let go of: retried
            if e.code() not in RETRIED_BY_THE_PROVISIONER:
                raise
            return False
        return True
    wait_for(gone, 30, f"DeleteVolume of {volume_id}")


def test_a_snapshot_under_writes_is_one_image_on_every_replica_and_restores_anywhere(env):
    cluster, _ = env
    vol = create(cluster, "snap-src", replicas=3)
    a = Attached(cluster, vol, cluster.node(1))
    dev = a.up()
    writer = VerifiedWriter(dev, blocks=2048, threads=2, fsync_every=16).start()
    writer.wait_writes(300)
    with writer._lock:  # noqa: SLF001 - what was acknowledged before the snapshot began
        before = dict(writer.acked)
    req = csi_pb2.CreateSnapshotRequest(name="snap-1", source_volume_id=vol.volume_id)
    snap = ctl(cluster).CreateSnapshot(req).snapshot
    assert ctl(cluster).CreateSnapshot(req).snapshot.snapshot_id == snap.snapshot_id
    writer.wait_writes(100)  # the writes went on after the barrier
    writer.stop()
    assert writer.errors == []
    assert snap.ready_to_use and snap.size_bytes == SIZE
    copies = stored(cluster, f"snapshot/{snap.snapshot_id}")["replicas"]
    assert sorted(c["node_id"] for c in copies) == ["node-z1", "node-z2", "node-z3"]
    files = [snapshot_file(node_of(cluster, c["node_id"]), c["snapshot_id"]) for c in copies]
    digests = {digest(f) for f in files}
    assert len(digests) == 1, "the replicas' snapshots differ"
    assert stale_blocks(files[0], before) == []
    assert writer.verify(dev, direct=True) == []  # and the volume went on unharmed

    # a restore into two replicas (zones 2 and 3) and into a local volume: the same image
    two = create(cluster, "snap-r2", replicas=2, zones=(2, 3),
                 source=from_snapshot(snap.snapshot_id))
    assert two.content_source.snapshot.snapshot_id == snap.snapshot_id
    states = stored(cluster, f"arbiter/{two.volume_id}")["replicas"]
    assert set(states.values()) == {"in_sync"}  # both copy-on-write copies
    for node_id in states:
        assert digest(replica_file(node_of(cluster, node_id), two.volume_id)) in digests
    local = create(cluster, "snap-r1", replicas=1, zones=(3,),
                   source=from_snapshot(snap.snapshot_id))
    b = Attached(cluster, local, cluster.node(3))
    assert digest(b.up()) in digests
    b.down()
    c = Attached(cluster, two, cluster.node(2))
    assert digest(c.up()) in digests  # read through its frontend
    c.down()
    a.down()
    ctl(cluster).DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    for f in files:
        assert not os.path.exists(f)
    for v in (vol, two, local):
        delete_volume(cluster, v.volume_id)


def test_a_restore_into_more_replicas_rebuilds_the_new_one_and_shows_its_progress(env):
    cluster, _ = env
    vol = create(cluster, "grow-src", replicas=2, zones=(1, 2))
    a = Attached(cluster, vol, cluster.node(1))
    writer = VerifiedWriter(a.up(), blocks=4096, threads=2)
    writer.start().wait_writes(400)
    writer.stop()
    a.down()  # unstaged: the snapshot needs no barrier, the replicas closed cleanly
    snap = ctl(cluster).CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="grow-snap", source_volume_id=vol.volume_id)).snapshot
    three = create(cluster, "grow-r3", replicas=3, source=from_snapshot(snap.snapshot_id))
    states = stored(cluster, f"arbiter/{three.volume_id}")["replicas"]
    assert states == {"node-z1": "in_sync", "node-z2": "in_sync", "node-z3": "out_of_sync"}
    cond = condition(cluster, three.volume_id)
    assert cond.abnormal and "node-z3 (zone-3): out_of_sync" in cond.message
    seen: list[str] = []
    with slowed(cluster.node(3)):  # the new replica takes its copies slowly
        b = Attached(cluster, three, cluster.node(2))
        dev = b.up()
        wait_for(lambda: seen.append(condition(cluster, three.volume_id).message) or re.search(
            r"node-z3 \(zone-3\): resyncing \d+%", seen[-1]), 30,
            "the rebuild's progress in the condition", lambda: "\n".join(seen[-3:]))
    wait_for(lambda: not condition(cluster, three.volume_id).abnormal, 60,
             "the new replica in sync", lambda: condition(cluster, three.volume_id).message)
    assert writer.verify(dev, direct=True) == []
    b.down()
    assert len({digest(replica_file(n, three.volume_id)) for n in cluster.nodes}) == 1
    ctl(cluster).DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    for v in (vol, three):
        delete_volume(cluster, v.volume_id)


def test_a_clone_of_a_volume_in_use_copies_its_replicas_at_one_barrier(env):
    cluster, _ = env
    vol = create(cluster, "clone-src", replicas=3)
    a = Attached(cluster, vol, cluster.node(3))
    writer = VerifiedWriter(a.up(), blocks=2048, threads=2, fsync_every=16).start()
    writer.wait_writes(300)
    clone = create(cluster, "clone-r2", replicas=2, zones=(1, 2),
                   source=from_volume(vol.volume_id))
    writer.stop()
    assert writer.errors == []
    assert set(stored(cluster, f"arbiter/{clone.volume_id}")["replicas"].values()) == {
        "in_sync"}
    assert digest(replica_file(cluster.node(1), clone.volume_id)) == digest(
        replica_file(cluster.node(2), clone.volume_id))
    a.down()
    for v in (clone, vol):
        delete_volume(cluster, v.volume_id)


def test_a_mounted_volume_grows_online_and_its_pod_gets_the_new_limits(env):
    cluster, lab = env
    uid, pod = lab.pod()
    vol = create(cluster, "xfs-grow", replicas=2, size=320 * MIB, fs_type="xfs",
                 zones=(1, 2), parameters={"maxReadIops": "600"})
    a = Attached(cluster, vol, cluster.node(1), fs_type="xfs", pod_uid=uid)
    mnt = a.up()
    assert json.loads(a.context[mirrored.QOS_KEY])["max_read_iops"] == 600
    data = os.urandom(8 * MIB)
    with open(os.path.join(mnt, "before"), "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    dev = os.stat(os.path.join(a.staging)).st_dev
    device = (os.major(dev), os.minor(dev))
    wait_for(lambda: limits.read_v1(pod, device).read_iops == 600, 10, "the tier on the pod")

    # ModifyVolume: the replicas' nodes admit it, the consumer node enforces it
    ctl(cluster).ControllerModifyVolume(csi_pb2.ControllerModifyVolumeRequest(
        volume_id=vol.volume_id, mutable_parameters={"maxReadIops": "250"}))
    assert limits.read_v1(pod, device).read_iops == 250

    # ControllerExpandVolume grows every replica, NodeExpandVolume the frontend and XFS
    before = os.statvfs(mnt)
    grown = ctl(cluster).ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(
            required_bytes=640 * MIB))).capacity_bytes
    assert grown == 640 * MIB
    for n in (cluster.node(1), cluster.node(2)):
        assert os.path.getsize(replica_file(n, vol.volume_id)) == 640 * MIB
    got = a.node.stubs().node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=vol.volume_id, volume_path=mnt, staging_target_path=a.staging,
        capacity_range=csi_pb2.CapacityRange(required_bytes=640 * MIB),
        volume_capability=a.cap))
    assert got.capacity_bytes == 640 * MIB
    after = os.statvfs(mnt)
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + 250 * MIB
    tail = os.urandom(4 * MIB)
    with open(os.path.join(mnt, "after"), "wb") as f:  # room only the growth gave
        os.posix_fallocate(f.fileno(), 0, before.f_bavail * before.f_frsize + 64 * MIB)
        f.seek(-len(tail), os.SEEK_END)
        f.write(tail)
        os.fsync(f.fileno())
    with open(os.path.join(mnt, "before"), "rb") as f:
        assert f.read() == data
    assert limits.read_v1(pod, device).read_iops == 250  # the same device, still limited
    assert not condition(cluster, vol.volume_id).abnormal

    # a snapshot of the mounted filesystem (frozen, then the barrier), restored into a
    # local volume beside one of its copies, mounts with the file in it
    snap = ctl(cluster).CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="xfs-snap", source_volume_id=vol.volume_id)).snapshot
    with open(os.path.join(mnt, "later"), "wb") as f:  # thawed: writes go on
        f.write(b"x" * 4096)
        os.fsync(f.fileno())
    a.down()
    assert limits.read_v1(pod, device).unlimited
    # (unmounted first: these "nodes" share one kernel, which refuses two XFS of one UUID)
    local = create(cluster, "xfs-local", replicas=1, size=640 * MIB, fs_type="xfs",
                   zones=(2,), source=from_snapshot(snap.snapshot_id))
    b = Attached(cluster, local, cluster.node(2), fs_type="xfs")
    restored = b.up()
    with open(os.path.join(restored, "before"), "rb") as f:
        assert f.read() == data
    assert not os.path.exists(os.path.join(restored, "later"))
    b.down()
    ctl(cluster).DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    for v in (local, vol):
        delete_volume(cluster, v.volume_id)


def test_a_snapshot_while_a_zone_is_cut_copies_the_replicas_that_serve(env):
    """A replica's node down at snapshot time: the snapshot has the other, identical copies
    (its frontend dropped the lost replica before the barrier could hold)."""
    cluster, _ = env
    vol = create(cluster, "cut-src", replicas=3)
    a = Attached(cluster, vol, cluster.node(1))
    dev = a.up()
    writer = VerifiedWriter(dev, blocks=1024, threads=2, fsync_every=16).start()
    writer.wait_writes(100)
    cluster.cut(3)
    try:
        wait_for(lambda: "node-z3" not in cluster.registered(), 20, "node-z3 unregistered")
        snap = ctl(cluster).CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name="cut-snap", source_volume_id=vol.volume_id)).snapshot
        writer.wait_writes(50)
        copies = stored(cluster, f"snapshot/{snap.snapshot_id}")["replicas"]
        assert sorted(c["node_id"] for c in copies) == ["node-z1", "node-z2"]
        assert len({digest(snapshot_file(node_of(cluster, c["node_id"]), c["snapshot_id"]))
                    for c in copies}) == 1
    finally:
        cluster.heal(3)
    writer.stop()
    assert writer.errors == []
    wait_for(lambda: not condition(cluster, vol.volume_id).abnormal, 60,
             "the cut replica back in sync", lambda: condition(
                 cluster, vol.volume_id).message + "\n" + frontend_log(a))
    try:
        assert writer.verify(dev, direct=True) == []
    except OSError as e:
        raise AssertionError(f"{e}\n{frontend_log(a)}") from e
    a.down()
    ctl(cluster).DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    delete_volume(cluster, vol.volume_id)
