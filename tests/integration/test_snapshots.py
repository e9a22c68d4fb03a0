"""Snapshots, restores, clones and group snapshots with real data on real devices."""

import hashlib
import os
import signal
import subprocess
import threading
import time

import grpc
import pytest

from proto import csi_pb2
from tests import support
from tests.conftest import etcd_namespace
from tests.integration.helpers import (
    MIB,
    create_request,
    mounts_under,
    publish_request,
    stage_request,
)

BLOCK_SIZE = 4096


class Volume:
    """One volume made, staged and published by a test, with data helpers."""

    def __init__(self, stubs, root: str, name: str, block: bool, size: int = 64 * MIB,
                 snapshot_id: str = "", clone_of: str = ""):
        self.stubs, self.block = stubs, block
        req = create_request(name, size=size, block=block)
        if snapshot_id:
            req.volume_content_source.snapshot.snapshot_id = snapshot_id
        if clone_of:
            req.volume_content_source.volume.volume_id = clone_of
        self.id = stubs.controller.CreateVolume(req).volume.volume_id
        self.staging = f"{root}/{name}-staging"
        self.target = f"{root}/{name}-target"
        os.makedirs(self.staging, exist_ok=True)
        stubs.node.NodeStageVolume(stage_request(self.id, self.staging, block))
        stubs.node.NodePublishVolume(publish_request(self.id, self.staging, self.target, block))

    def write(self, offset: int, data: bytes) -> None:
        if self.block:
            fd = os.open(self.target, os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            with open(f"{self.target}/f{offset}", "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

    def read(self, offset: int, length: int) -> bytes:
        if self.block:
            fd = os.open(self.target, os.O_RDONLY)
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)
        try:
            with open(f"{self.target}/f{offset}", "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def release(self, delete: bool = True) -> None:
        self.stubs.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=self.id, target_path=self.target))
        self.stubs.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=self.id, staging_target_path=self.staging))
        if delete:
            self.stubs.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=self.id))


def snapshot(stubs, name: str, volume_id: str) -> csi_pb2.Snapshot:
    req = csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=volume_id)
    snap = stubs.controller.CreateSnapshot(req).snapshot
    assert stubs.controller.CreateSnapshot(req).snapshot == snap  # idempotent
    assert snap.ready_to_use and snap.source_volume_id == volume_id and snap.size_bytes > 0
    return snap


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_snapshot_overwrite_restore_round_trip(stubs, test_root, block):
    vol = Volume(stubs, test_root, "src", block)
    before, after = os.urandom(BLOCK_SIZE * 4), os.urandom(BLOCK_SIZE * 4)
    vol.write(8 * MIB, before)
    snap = snapshot(stubs, "s1", vol.id)
    vol.write(8 * MIB, after)
    # restored at the same size and larger; the source keeps its new data
    same = Volume(stubs, test_root, "same", block, snapshot_id=snap.snapshot_id)
    larger = Volume(stubs, test_root, "larger", block, size=128 * MIB,
                    snapshot_id=snap.snapshot_id)
    for restored in (same, larger):
        assert restored.read(8 * MIB, len(before)) == before
    assert vol.read(8 * MIB, len(after)) == after
    got = stubs.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert got.snapshot == snap
    listed = stubs.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(
        source_volume_id=vol.id)).entries
    assert [e.snapshot.snapshot_id for e in listed] == [snap.snapshot_id]
    for v in (same, larger, vol):
        v.release()


def test_snapshot_outlives_its_source_and_errors(stubs, test_root):
    vol = Volume(stubs, test_root, "src", block=True)
    data = os.urandom(BLOCK_SIZE)
    vol.write(0, data)
    snap = snapshot(stubs, "keep", vol.id)
    other = stubs.controller.CreateVolume(create_request("other")).volume
    with pytest.raises(grpc.RpcError) as e:
        stubs.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name="keep", source_volume_id=other.volume_id))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as e:
        stubs.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name="nope", source_volume_id="vol-" + "0" * 32))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:  # smaller than the snapshot
        stubs.controller.CreateVolume(create_request("small", size=32 * MIB, block=True,
                                                     volume_content_source=csi_pb2.VolumeContentSource(
                                                         snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
                                                             snapshot_id=snap.snapshot_id))))
    assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
    vol.release(delete=True)  # deleting a volume with snapshots is allowed
    restored = Volume(stubs, test_root, "restored", block=True, snapshot_id=snap.snapshot_id)
    assert restored.read(0, BLOCK_SIZE) == data
    restored.release()
    stubs.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    stubs.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert not stubs.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries


class SequenceWriter(threading.Thread):
    """Writes numbered, checksummed records and remembers which were acknowledged."""

    def __init__(self, vol: Volume):
        super().__init__(daemon=True)
        self.vol = vol
        self.acked = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    @staticmethod
    def record(n: int) -> bytes:
        body = n.to_bytes(8, "little") * (BLOCK_SIZE // 8 - 4)
        return body + hashlib.sha256(body).digest()

    def run(self) -> None:
        try:
            n = 0
            while not self.stop.is_set() and n < 4000:
                n += 1
                self.vol.write(n * BLOCK_SIZE, self.record(n))
                self.acked = n
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_snapshot_while_writing_keeps_every_acknowledged_write(stubs, test_root, block):
    vol = Volume(stubs, test_root, "busy", block)
    writer = SequenceWriter(vol)
    writer.start()
    time.sleep(0.3)
    acked_before = writer.acked
    snap = snapshot(stubs, "busy-snap", vol.id)
    time.sleep(0.2)
    writer.stop.set()
    writer.join()
    assert writer.error is None
    assert acked_before > 0
    restored = Volume(stubs, test_root, "restored", block, snapshot_id=snap.snapshot_id)
    for n in range(1, acked_before + 1):
        assert restored.read(n * BLOCK_SIZE, BLOCK_SIZE) == SequenceWriter.record(n), n
    restored.release()
    vol.release()
    if not block:
        assert not [m for m in mounts_under(test_root)]  # and nothing left frozen


@pytest.mark.parametrize("store", ["sqlite", "etcd"])
@pytest.mark.parametrize("point", ["snapshot-after-freeze", "snapshot-after-storage",
                                   "create-snapshot-after-engine"])
def test_kill_9_during_create_snapshot(request, test_root, point, store):
    extra = []
    if store == "etcd":  # the cluster's records in etcd, the node's in its own SQLite
        extra = ["--store", request.getfixturevalue("etcd_url"),
                 "--store-namespace", etcd_namespace()]
    proc = support.DriverProcess(test_root, extra=extra)
    proc.start(env={"TANDEM_CRASH_AT": point})
    try:
        stubs = proc.stubs()
        vol = Volume(stubs, test_root, "src", block=False)
        vol.write(0, b"before the crash")
        with pytest.raises(grpc.RpcError) as e:
            stubs.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
                name="s", source_volume_id=vol.id))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        proc.wait_exit()
        proc.start()
        stubs = proc.stubs()
        vol.stubs = stubs
        # either a complete snapshot or none; the filesystem is thawed and writable
        assert len(stubs.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries) == 0
        vol.write(4096, b"after the restart")
        snap = snapshot(stubs, "s", vol.id)  # the CO's retry
        assert len(os.listdir(f"{test_root}/state/pool/snapshots")) == 1
        restored = Volume(stubs, test_root, "restored", block=False,
                          snapshot_id=snap.snapshot_id)
        assert restored.read(0, 0) == b"before the crash"
        restored.release()
        vol.release()
    finally:
        proc.stop(signal.SIGKILL)


def test_unstage_waits_for_a_snapshot_holding_the_volume_frozen(test_root):
    """The snapshot's freeze and the node's unpublish/unstage take one per-volume lock:
    an unpublish that arrives while the filesystem is frozen is ABORTED (the kubelet
    retries), and the retry after the snapshot unmounts cleanly: nothing unmounts a frozen
    filesystem, and the snapshot never freezes a filesystem going away."""
    proc = support.DriverProcess(test_root)
    proc.start(env={"TANDEM_PAUSE_AT": "snapshot-after-freeze:2"})
    snapper: threading.Thread | None = None
    try:
        stubs = proc.stubs()
        vol = Volume(stubs, test_root, "held", block=False)
        vol.write(0, b"before the snapshot")
        done: dict[str, float] = {}

        def take_snapshot() -> None:
            stubs.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
                name="s", source_volume_id=vol.id))
            done["snapshot"] = time.monotonic()
        snapper = threading.Thread(target=take_snapshot)
        snapper.start()
        time.sleep(0.7)  # the snapshot holds the filesystem frozen for 2 s from here
        aborted = 0
        while True:  # as the kubelet does: NodeUnpublish + NodeUnstage, retried on ABORTED
            try:
                vol.release(delete=False)
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.ABORTED, e
                aborted += 1
                time.sleep(0.2)
        snapper.join(30)
        assert "snapshot" in done, "the snapshot failed"
        assert aborted, "the unpublish ran beside the frozen snapshot"
        assert not [m for m in mounts_under(test_root)]  # unmounted, nothing left frozen
        (snap,) = stubs.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries
        assert snap.snapshot.ready_to_use
    finally:
        if snapper is not None:  # a kill while it holds the freeze would keep it frozen
            snapper.join(30)
        proc.stop(signal.SIGKILL)


def test_group_snapshot_freezes_mounted_members_together(stubs, test_root):
    a = Volume(stubs, test_root, "a", block=False)
    b = Volume(stubs, test_root, "b", block=False)
    a.write(0, b"a-data")
    b.write(0, b"b-data")
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(name="grp", source_volume_ids=[a.id, b.id])
    group = stubs.group.CreateVolumeGroupSnapshot(req).group_snapshot
    assert stubs.group.CreateVolumeGroupSnapshot(req).group_snapshot == group
    assert len(group.snapshots) == 2
    assert {s.group_snapshot_id for s in group.snapshots} == {group.group_snapshot_id}
    by_source = {s.source_volume_id: s.snapshot_id for s in group.snapshots}
    ra = Volume(stubs, test_root, "ra", block=False, snapshot_id=by_source[a.id])
    rb = Volume(stubs, test_root, "rb", block=False, snapshot_id=by_source[b.id])
    assert (ra.read(0, 0), rb.read(0, 0)) == (b"a-data", b"b-data")
    got = stubs.group.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=group.group_snapshot_id))
    assert got.group_snapshot == group

    # a block volume in use cannot be paused: refused, nothing made
    c = Volume(stubs, test_root, "c", block=True)
    with pytest.raises(grpc.RpcError) as e:
        stubs.group.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
            name="mixed", source_volume_ids=[a.id, c.id]))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "paused" in e.value.details()
    assert len(stubs.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries) == 2

    stubs.group.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=group.group_snapshot_id))
    assert not stubs.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries
    for v in (ra, rb, a, b, c):
        v.release()


def test_snapshot_metadata_allocated_and_delta(stubs, test_root):
    vol = Volume(stubs, test_root, "cbt", block=True)
    vol.write(1 * MIB, os.urandom(64 * 1024))
    s1 = snapshot(stubs, "s1", vol.id)
    vol.write(20 * MIB, os.urandom(64 * 1024))
    s2 = snapshot(stubs, "s2", vol.id)

    def ranges(pages):
        return [(b.byte_offset, b.size_bytes) for p in pages for b in p.block_metadata]

    allocated = ranges(stubs.metadata.GetMetadataAllocated(
        csi_pb2.GetMetadataAllocatedRequest(snapshot_id=s1.snapshot_id)))
    assert any(o <= 1 * MIB < o + n for o, n in allocated)
    assert not any(o <= 20 * MIB < o + n for o, n in allocated)
    delta = ranges(stubs.metadata.GetMetadataDelta(csi_pb2.GetMetadataDeltaRequest(
        base_snapshot_id=s1.snapshot_id, target_snapshot_id=s2.snapshot_id)))
    assert any(o <= 20 * MIB < o + n for o, n in delta)
    assert not any(o <= 1 * MIB < o + n for o, n in delta)
    assert sum(n for _, n in delta) <= 4 * MIB  # the change, not the volume
    with pytest.raises(grpc.RpcError) as e:
        list(stubs.metadata.GetMetadataAllocated(
            csi_pb2.GetMetadataAllocatedRequest(snapshot_id="snap-" + "0" * 32)))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    vol.release()


def test_snapshot_of_a_full_pool_is_refused_whole(test_root):
    d = support.InProcessDriver(support.test_config(test_root, pool_image_bytes=512 * MIB))
    try:
        vol = Volume(d.stubs, test_root, "filler", block=True, size=600 * MIB)
        subprocess.run(["dd", "if=/dev/zero", f"of={vol.target}", "bs=4M", "oflag=direct",
                        "status=none"], capture_output=True)
        with pytest.raises(grpc.RpcError) as e:
            d.stubs.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
                name="nope", source_volume_id=vol.id))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not d.stubs.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries
        assert os.listdir(f"{test_root}/state/pool/snapshots") == []
        vol.release()
    finally:
        d.close()


@pytest.mark.parametrize("copy", ["snapshot", "clone"])
def test_unflushed_writes_of_a_mounted_volume_reach_the_copy(stubs, test_root, copy):
    """The filesystem is frozen for the instant of the copy: what sits in its page cache,
    never fsync'd by the application, is flushed into the copy (and the copy is clean)."""
    vol = Volume(stubs, test_root, "src", block=False)
    with open(f"{vol.target}/unsynced", "wb") as f:
        f.write(b"only in the page cache")  # no fsync
    if copy == "snapshot":
        snap = snapshot(stubs, "s", vol.id)
        made = Volume(stubs, test_root, "copy", block=False, snapshot_id=snap.snapshot_id)
    else:
        made = Volume(stubs, test_root, "copy", block=False, clone_of=vol.id)
    with open(f"{made.target}/unsynced", "rb") as f:
        assert f.read() == b"only in the page cache"
    made.release()
    vol.release()


def test_shared_extents_are_counted_once(stubs, test_root, driver):
    """A snapshot costs no space until the volume diverges; deleting the volume frees only
    what the snapshot does not share; deleting the snapshot then frees the rest."""
    pool = driver.driver.engine.files.pool

    def free() -> int:
        subprocess.run(["sync", "-f", pool.directory], check=True)
        return pool.usage().free_bytes

    def settles_at_least(target: int) -> int:
        deadline = time.monotonic() + 30  # btrfs returns deleted space in the background
        while (now := free()) < target and time.monotonic() < deadline:
            time.sleep(0.2)
        return now

    vol = Volume(stubs, test_root, "data", block=True, size=256 * MIB)
    base = free()
    vol.write(0, os.urandom(64 * MIB))
    written = base - free()
    assert written >= 60 * MIB
    snap = snapshot(stubs, "s", vol.id)
    assert base - free() < written + 8 * MIB  # the snapshot shares every extent
    vol.release(delete=True)
    after_delete = settles_at_least(base - written - 8 * MIB)
    assert base - after_delete >= written - 8 * MIB  # the snapshot still holds the data
    stubs.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert settles_at_least(base - 8 * MIB) >= base - 8 * MIB  # now the data is gone too
