"""Backups to a real S3 server (Ceph radosgw on loopback), restored by other drivers.

Each test takes a bucket of its own on the session's radosgw (tests/rgw.py). "Another
cluster" is a second all-in-one driver with its own state dir, pool and store, given the
same targets file: all it shares with the first is the bucket.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import grpc
import pytest

from proto import csi_pb2
from tests import support
from tests.integration.helpers import MIB, BlockVolume, create_request
from tests.rgw import Bucket

KEY = "tandem-test-key-" + "k" * 32
BLOCK = 4096
SIZE = 64 * MIB


@pytest.fixture
def bucket(rgw):
    b = Bucket(rgw)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def secrets(rgw):
    return {"accessKeyId": rgw.access_key, "secretAccessKey": rgw.secret_key,
            "encryptionKey": KEY}


def targets_file(root: str, rgw, bucket: Bucket, **extra) -> str:
    path = f"{root}/targets.json"
    with open(path, "w") as f:
        json.dump({"targets": {"offsite": {"endpoint": rgw.endpoint, "bucket": bucket.name,
                                           "prefix": "cluster-a", **extra}}}, f)
    return path


def driver(root: str, targets: str, **overrides) -> support.InProcessDriver:
    os.makedirs(root, exist_ok=True)
    return support.InProcessDriver(support.test_config(root, backup_targets_file=targets,
                                                       **overrides))


@pytest.fixture
def clusters(test_root, rgw, bucket):
    """Two drivers that share nothing but the bucket."""
    made: list[support.InProcessDriver] = []
    try:
        for name in ("a", "b"):
            root = f"{test_root}/{name}"
            os.makedirs(root)
            made.append(driver(root, targets_file(root, rgw, bucket)))
        yield made
    finally:
        for d in made:
            d.close()


def new_block_volume(stubs, root: str, name: str, size: int = SIZE) -> BlockVolume:
    vol = stubs.controller.CreateVolume(create_request(name, size=size, block=True)).volume
    return BlockVolume(stubs, root, vol.volume_id)


def random_blocks(vol: BlockVolume, count: int, rng: random.Random,
                  size: int = SIZE) -> set[int]:
    """Write `count` random 4 KiB blocks at distinct offsets; the blocks' numbers."""
    blocks = set(rng.sample(range(size // BLOCK), count))
    for b in blocks:
        vol.write(b * BLOCK, rng.randbytes(BLOCK))
    return blocks


def backup(stubs, name: str, volume_id: str, secrets: dict, timeout_s: float = 60.0):
    req = csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=volume_id,
                                        parameters={"backupTarget": "offsite"}, secrets=secrets)
    deadline = time.monotonic() + timeout_s
    while True:
        snap = stubs.controller.CreateSnapshot(req).snapshot
        assert snap.snapshot_id.startswith("bkp:offsite:") and snap.source_volume_id == volume_id
        if snap.ready_to_use:
            return snap
        assert time.monotonic() < deadline, f"backup {name} not uploaded in {timeout_s}s"
        time.sleep(0.1)


def restore_request(name: str, snapshot_id: str, secrets: dict, size: int = SIZE):
    return create_request(name, size=size, block=True, secrets=secrets,
                          volume_content_source=csi_pb2.VolumeContentSource(
                              snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
                                  snapshot_id=snapshot_id)))


def restore(stubs, name: str, snapshot_id: str, secrets: dict, timeout_s: float = 60.0,
            size: int = SIZE) -> str:
    """CreateVolume from the backup, retried while ABORTED (as the provisioner does)."""
    req = restore_request(name, snapshot_id, secrets, size)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return stubs.controller.CreateVolume(req).volume.volume_id
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def restored_digest(stubs, root: str, name: str, snapshot_id: str, secrets: dict,
                    size: int = SIZE) -> str:
    vol = BlockVolume(stubs, root, restore(stubs, name, snapshot_id, secrets, size=size))
    try:
        return vol.digest()
    finally:
        vol.release()


def code_of(call, req) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(req)
    return e.value


def test_full_backup_restores_in_another_cluster_from_the_bucket_alone(
        clusters, test_root, bucket, secrets):
    a, b = (c.stubs for c in clusters)
    vol = new_block_volume(a, test_root, "src")
    rng = random.Random(1)
    vol.write(8 * MIB, rng.randbytes(8 * MIB))  # a contiguous run
    run = set(range(8 * MIB // BLOCK, 16 * MIB // BLOCK))
    written = len(run | random_blocks(vol, 64, rng)) * BLOCK  # and scattered blocks
    source = vol.digest()
    snap = backup(a, "b1", vol.id, secrets)
    assert len(snap.snapshot_id.encode()) <= 128 and snap.size_bytes == SIZE
    # holes were not sent: the packs hold the written data, sealed, and little else
    sent = sum(bucket.packs().values())
    assert written <= sent < written * 1.02 + 64 * 1024, (written, sent)

    # the other cluster knows it from the bucket alone (a pre-provisioned content)
    listed = b.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(
        snapshot_id=snap.snapshot_id, secrets=secrets)).entries
    assert [(e.snapshot.snapshot_id, e.snapshot.ready_to_use, e.snapshot.size_bytes)
            for e in listed] == [(snap.snapshot_id, True, SIZE)]
    # a restore answers ABORTED while it runs; the repeated call returns the same volume
    req = restore_request("r1", snap.snapshot_id, secrets)
    first = restore(b, "r1", snap.snapshot_id, secrets)
    assert b.controller.CreateVolume(req).volume.volume_id == first
    restored = BlockVolume(b, f"{test_root}/b", first)
    assert restored.digest() == source
    restored.release()
    # and in the first cluster too, on its own node
    assert restored_digest(a, test_root, "r2", snap.snapshot_id, secrets) == source
    vol.release()

    # a missing backup, a missing target
    missing = "bkp:offsite:" + "0" * 32
    assert not b.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(
        snapshot_id=missing, secrets=secrets)).entries
    assert code_of(b.controller.CreateVolume, restore_request("r3", missing, secrets)).code() \
        == grpc.StatusCode.NOT_FOUND
    assert code_of(b.controller.CreateVolume, restore_request(
        "r4", "bkp:elsewhere:" + "0" * 32, secrets)).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(a.controller.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
        name="x", source_volume_id=vol.id, parameters={"backupTarget": "elsewhere"},
        secrets=secrets)).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_incremental_chain_uploads_changed_blocks_and_survives_a_deletion(
        clusters, test_root, rgw, bucket, secrets):
    a, b = (c.stubs for c in clusters)
    vol = new_block_volume(a, test_root, "src")
    rng = random.Random(2)
    vol.write(0, rng.randbytes(SIZE))  # full
    digests, snaps = [], []
    for i in range(3):
        if i:
            before = bucket.objects()
            changed = len(random_blocks(vol, 256, rng)) * BLOCK  # 1 MiB in 256 places
        digests.append(vol.digest())
        snaps.append(backup(a, f"b{i}", vol.id, secrets))
        if not i:
            first_packs = set(bucket.packs())
        if i:
            new = {k: v for k, v in bucket.objects().items() if k not in before}
            uploaded = sum(new.values())
            # only the changed blocks (sealed) and the manifest, not the 64 MiB volume
            assert changed <= uploaded < 2 * changed, (changed, uploaded)
    plane = clusters[0].driver.plane
    assert plane is not None
    kept = [plane.snapshots.record(s.snapshot_id)[0].backup.local for s in snaps]
    assert kept == [False, False, True]  # only the newest stays as the next base

    # the middle one goes: not without credentials, and not while an upload runs
    middle = snaps[1].snapshot_id
    err = code_of(a.controller.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest(
        snapshot_id=middle))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "Secret" in err.details()
    lock_key = "cluster-a/locks/upload-" + "f" * 32
    bucket.put(lock_key, b"{}")
    err = code_of(a.controller.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest(
        snapshot_id=middle, secrets=secrets))
    assert err.code() == grpc.StatusCode.ABORTED and "upload is in progress" in err.details()
    bucket.s3.delete_object(Bucket=bucket.name, Key=lock_key)
    for _ in range(2):  # idempotent
        a.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=middle,
                                                                  secrets=secrets))
    assert f"cluster-a/backups/{middle.rsplit(':', 1)[1]}" not in bucket.objects()
    assert not a.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(
        snapshot_id=middle, secrets=secrets)).entries
    # the others restore, each on its own (no chain to walk)
    for i in (0, 2):
        got = restored_digest(b, f"{test_root}/b", f"r{i}", snaps[i].snapshot_id, secrets)
        assert got == digests[i], f"backup {i}"
    # the newest one too (from the other cluster: it holds no record): now the data only
    # the deleted ones referenced goes, and the first backup's stays
    b.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(
        snapshot_id=snaps[2].snapshot_id, secrets=secrets))
    assert set(bucket.packs()) == first_packs
    got = restored_digest(b, f"{test_root}/b", "r0-again", snaps[0].snapshot_id, secrets)
    assert got == digests[0]
    vol.release()


def test_damaged_or_missing_data_fails_the_restore_with_data_loss(
        clusters, test_root, rgw, bucket, secrets):
    a, b = (c.stubs for c in clusters)
    vol = new_block_volume(a, test_root, "src")
    vol.write(0, random.Random(3).randbytes(4 * MIB))
    snap = backup(a, "b1", vol.id, secrets)
    vol.release()
    (pack_key,) = bucket.packs()
    data = bytearray(bucket.get(pack_key))
    data[len(data) // 2] ^= 0x40
    bucket.put(pack_key, bytes(data))
    err = _restore_error(b, "r1", snap.snapshot_id, secrets)
    assert err.code() == grpc.StatusCode.DATA_LOSS and "blob" in err.details() \
        and pack_key.rsplit("/", 1)[1] in err.details(), err.details()
    # the operator's check says the same
    verify = admin(["backup", "verify", "--targets-file", f"{test_root}/a/targets.json",
                    snap.snapshot_id], secrets)
    assert verify.returncode == 1 and "DataLoss" in verify.stderr and "blob" in verify.stderr
    bucket.s3.delete_object(Bucket=bucket.name, Key=pack_key)
    err = _restore_error(b, "r2", snap.snapshot_id, secrets)
    assert err.code() == grpc.StatusCode.DATA_LOSS and "missing" in err.details()


def _restore_error(stubs, name: str, snapshot_id: str, secrets: dict) -> grpc.RpcError:
    """The first answer to the CreateVolume retries that is not ABORTED (running)."""
    with pytest.raises(grpc.RpcError) as e:
        restore(stubs, name, snapshot_id, secrets, timeout_s=30)
    return e.value


def admin(args: list[str], secrets: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "TANDEM_BACKUP_SECRETS": json.dumps(secrets)}
    return subprocess.run([sys.executable, "-m", "csi.admin", *args], cwd=support.REPO,
                          env=env, capture_output=True, text=True, timeout=60)


def checkpointed_bytes(state_dir: str) -> int:
    """The volume bytes a killed upload's checkpoints say are durable in the bucket."""
    from engine.backup.jobs import CHECKPOINT
    from engine.state import SqliteStore

    store = SqliteStore(f"{state_dir}/state.sqlite")
    try:
        return sum(n for _, cp in store.list(CHECKPOINT) for _, n, _, _ in cp["extents"])
    finally:
        store.close()


def test_wrong_key_is_refused(clusters, test_root, bucket, secrets):
    a, b = (c.stubs for c in clusters)
    vol = new_block_volume(a, test_root, "src")
    vol.write(0, os.urandom(BLOCK))
    snap = backup(a, "b1", vol.id, secrets)
    wrong = {**secrets, "encryptionKey": "another-key-" + "w" * 32}
    err = code_of(b.controller.CreateVolume, restore_request("r1", snap.snapshot_id, wrong))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "refused" in err.details()
    err = code_of(b.controller.ListSnapshots, csi_pb2.ListSnapshotsRequest(
        snapshot_id=snap.snapshot_id, secrets=wrong))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    # a new backup to the target with another key is refused too (nothing uploaded)
    packs = bucket.packs()
    with pytest.raises(grpc.RpcError) as e:
        backup(a, "b2", vol.id, wrong, timeout_s=20)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bucket.packs() == packs
    vol.release()


def test_interrupted_upload_and_restore_resume_and_credentials_never_reach_the_log(
        test_root, rgw, bucket, secrets):
    os.makedirs(f"{test_root}/a")
    targets = targets_file(f"{test_root}/a", rgw, bucket)
    proc = support.DriverProcess(f"{test_root}/a", extra=[
        "--backup-targets", targets, "--log-level", "DEBUG"])
    size = 128 * MIB
    try:
        proc.start()
        stubs = proc.stubs()
        vol = new_block_volume(stubs, f"{test_root}/a", "src", size=size)
        for off in range(0, size, 16 * MIB):
            vol.write(off, os.urandom(16 * MIB))
        source = vol.digest()
        req = csi_pb2.CreateSnapshotRequest(name="b1", source_volume_id=vol.id,
                                            parameters={"backupTarget": "offsite"},
                                            secrets=secrets)
        snap = stubs.controller.CreateSnapshot(req).snapshot
        assert not snap.ready_to_use  # returned promptly: the upload runs in the background
        deadline = time.monotonic() + 60
        while not checkpointed_bytes(f"{test_root}/a/state"):  # kill it once a pack is in
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.stop(signal.SIGKILL)
        assert f"cluster-a/backups/{snap.snapshot_id.rsplit(':', 1)[1]}" not in \
            bucket.objects(), "killed too late: the upload had finished"
        checkpointed = checkpointed_bytes(f"{test_root}/a/state")
        proc.start()
        stubs = proc.stubs()
        # not ready after the restart; the repeated CreateSnapshot resumes it
        snap = backup(stubs, "b1", vol.id, secrets, timeout_s=90)
        vol.release()
        status = admin(["--state-dir", f"{test_root}/a/state", "backup", "status"], {})
        assert status.returncode == 0, status.stderr
        (job,) = json.loads(status.stdout)["backup-job"]
        assert job["phase"] == "done"
        # resumed, not started over: what the checkpoints covered was not sent again
        assert 0 < job["bytes_uploaded"] <= (size - checkpointed) * 1.01 + 64 * 1024, \
            (job["bytes_uploaded"], checkpointed)

        # a restore cut by a kill -9 starts again on the provisioner's next retry
        req = restore_request("r1", snap.snapshot_id, secrets, size)
        assert code_of(stubs.controller.CreateVolume, req).code() == grpc.StatusCode.ABORTED
        proc.stop(signal.SIGKILL)
        (job,) = node_jobs(f"{test_root}/a/state", "restore-job")
        assert job["phase"] == "running", "killed too late: the restore had finished"
        proc.start()
        stubs = proc.stubs()
        restored = BlockVolume(stubs, f"{test_root}/a",
                               restore(stubs, "r1", snap.snapshot_id, secrets, size=size))
        got = restored.digest()
        restored.release()
    finally:
        proc.stop(signal.SIGTERM)
    assert got == source
    with open(proc.log_path, encoding="utf-8", errors="replace") as f:
        log = f.read()
    assert "backup bkp:offsite:" in log and "restored from backup" in log  # a real log
    for value in secrets.values():
        assert value not in log


def node_jobs(state_dir: str, kind: str) -> list[dict]:
    from engine.state import SqliteStore

    store = SqliteStore(f"{state_dir}/state.sqlite")
    try:
        return [rec for _, rec in store.list(kind)]
    finally:
        store.close()


def test_garbage_collection_never_races_an_upload(rgw, bucket, secrets, tmp_path):
    from engine.backup.repo import Repository
    from engine.backup.targets import Targets
    from engine.errors import Busy, NotFound

    targets = Targets.load(targets_file(str(tmp_path), rgw, bucket))
    store = targets.resolve("offsite", secrets, "test")
    repo = Repository.open(store, create=True, lock_stale_s=2.0)
    orphan = repo.write_pack(b"left by a cancelled upload")
    # an upload in progress: no collection (its packs are referenced by no manifest yet)
    upload = repo.lock_upload("a" * 32)
    with pytest.raises(Busy, match="upload is in progress"):
        repo.collect_garbage()
    assert repo.pack_key(orphan) in bucket.objects()
    repo.release_lock(upload)
    # a collection in progress: no upload starts
    gc = repo.take_lock("gc", "b" * 32)
    with pytest.raises(Busy, match="garbage collection"):
        repo.lock_upload("c" * 32)
    assert not repo.fresh_locks("upload")  # it withdrew its lock
    repo.release_lock(gc)
    assert repo.collect_garbage() == (1, len(b"left by a cancelled upload"))
    assert repo.pack_key(orphan) not in bucket.objects()
    # a deleted backup never completes: an upload of it that begins later withdraws
    # (a node the controller could not reach to stop it), and leaves no lock behind
    repo.delete_backup("e" * 32)
    with pytest.raises(NotFound, match="was deleted"):
        repo.lock_upload("e" * 32)
    assert not repo.fresh_locks("upload")
    # a lock its process stopped refreshing is ignored once stale
    stale = repo.take_lock("upload", "d" * 32)
    time.sleep(2.5)
    assert repo.collect_garbage() == (0, 0)
    repo.release_lock(stale)
    # large objects go in parts, confirmed by HEAD (radosgw 16.2 gives them an empty ETag)
    from engine.backup.s3 import Bucket as S3Bucket
    parts = S3Bucket(store, multipart_threshold=5 * MIB, part_bytes=5 * MIB)
    big = os.urandom(12 * MIB)
    parts.put("cluster-a/big", big)
    assert parts.get("cluster-a/big", 5 * MIB, 6 * MIB) == big[5 * MIB:6 * MIB]
    assert parts.bytes_sent == len(big)
    bucket.s3.delete_object(Bucket=bucket.name, Key="cluster-a/big")
    # the operator's command does the same
    result = admin(["backup", "gc", "--targets-file", f"{tmp_path}/targets.json", "offsite"],
                   secrets)
    assert result.returncode == 0 and json.loads(result.stdout)["packs_deleted"] == 0, \
        result.stderr
