"""The controller's side of backups on in-memory nodes, without root or a bucket: which
base an incremental gets, which local snapshots are kept, how a job's progress and errors
reach the record and the CO, and how a restore holds its volume's creation."""

from __future__ import annotations

import pytest

from control.backups import Backups
from control.node_api import JOB_DONE, JOB_FAILED, JOB_RUNNING, JobStatus, VolumeSource
from control.records import CREATING, READY, UPLOADED, UPLOADING
from engine.backup.targets import Target, Targets
from engine.errors import Busy, DataLoss, InvalidSpec, Precondition
from tests.fake_nodes import FakeNode
from tests.unit.test_control_volumes import Cluster

SECRETS = {"accessKeyId": "AK", "secretAccessKey": "SK", "encryptionKey": "k" * 40}


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(str(tmp_path / "cluster.sqlite"), [FakeNode("n1", "z1")])
    targets = Targets({"t": Target("t", "http://127.0.0.1:9", "bucket")})
    c.backups = Backups(c.store, c.registry, targets, intent_timeout_s=600, clock=c.clock)
    c.snapshots.backups = c.volumes.backups = c.backups
    yield c
    c.store.close()


def take(c, name: str, volume_id: str):
    snap = c.snapshots.create(name, volume_id, name, backup_target="t")
    assert snap.state == READY and snap.snapshot_id.startswith("bkp:t:")
    return c.backups.advance(snap.snapshot_id, SECRETS)


DONE = JobStatus(JOB_DONE)


def finish(c, snapshot_id: str, status: JobStatus = DONE):
    node = c.nodes["n1"]
    node.finish_job(node.backups, snapshot_id, status)
    return c.backups.advance(snapshot_id, SECRETS)


def test_incrementals_chain_on_the_newest_uploaded_backup_and_release_older_ones(cluster):
    c = cluster
    node = c.nodes["n1"]
    vol = c.create("v")
    b1 = take(c, "b1", vol.volume_id)
    assert b1.backup.phase == UPLOADING and not b1.ready_to_use
    assert node.backups[b1.snapshot_id][0].base_snapshot_id == ""  # the first is full
    b1 = finish(c, b1.snapshot_id)
    assert b1.ready_to_use and b1.backup.phase == UPLOADED
    c.clock.now += 1
    b2 = take(c, "b2", vol.volume_id)
    c.clock.now += 1
    b3 = take(c, "b3", vol.volume_id)  # started before b2 is uploaded: its base is b1 too
    for b in (b2, b3):
        job = node.backups[b.snapshot_id][0]
        assert (job.base_snapshot_id, job.base_backup_id) == (b1.snapshot_id,
                                                              b1.backup.backup_id)
    finish(c, b2.snapshot_id)
    # b1 stays: b3's upload still reads it as its base
    assert c.snapshots.record(b1.snapshot_id)[0].backup.local
    assert b1.snapshot_id in node.snapshots
    finish(c, b3.snapshot_id)
    kept = {s: c.snapshots.record(s)[0].backup.local
            for s in (b1.snapshot_id, b2.snapshot_id, b3.snapshot_id)}
    assert kept == {b1.snapshot_id: False, b2.snapshot_id: False, b3.snapshot_id: True}
    assert set(node.snapshots) == {b3.snapshot_id}  # records first, storage second
    # the next one builds on the newest kept one
    c.clock.now += 1
    b4 = take(c, "b4", vol.volume_id)
    assert node.backups[b4.snapshot_id][0].base_snapshot_id == b3.snapshot_id


def test_a_failed_upload_is_reported_and_restarted_and_a_restart_resumes_it(cluster):
    c = cluster
    node = c.nodes["n1"]
    vol = c.create("v")
    b1 = take(c, "b1", vol.volume_id)
    node.finish_job(node.backups, b1.snapshot_id, JobStatus(
        JOB_FAILED, 100, 40, 40, "blob abc is damaged", "DataLoss"))
    with pytest.raises(DataLoss, match="blob abc"):
        c.backups.advance(b1.snapshot_id, SECRETS)
    assert node.backups[b1.snapshot_id][1].phase == JOB_RUNNING  # restarted by that call
    assert c.snapshots.record(b1.snapshot_id)[0].backup.last_error == "blob abc is damaged"
    # a driver restart: the node has the snapshot but no job; the next call starts it
    del node.backups[b1.snapshot_id]
    with pytest.raises(Precondition, match="credentials"):
        c.backups.advance(b1.snapshot_id, {})  # nothing to reach the bucket with
    assert c.backups.advance(b1.snapshot_id, SECRETS).backup.phase == UPLOADING
    assert finish(c, b1.snapshot_id).ready_to_use
    # the repeated CreateSnapshot of a finished backup asks the node nothing more
    calls = len(node.calls)
    assert c.backups.advance(b1.snapshot_id, {}).ready_to_use
    assert len(node.calls) == calls


def test_unknown_target_and_incomplete_secrets_are_refused(cluster):
    c = cluster
    with pytest.raises(InvalidSpec, match="not known"):
        c.backups.check_target("elsewhere")
    vol = c.create("v")
    snap = c.snapshots.create("b1", vol.volume_id, "b1", backup_target="t")
    with pytest.raises(InvalidSpec, match="secretAccessKey"):
        c.backups.advance(snap.snapshot_id, {"accessKeyId": "AK", "encryptionKey": "k" * 40})


def test_a_restore_holds_its_volume_creating_until_done_and_extends_the_deadline(cluster):
    c = cluster
    node = c.nodes["n1"]
    source = VolumeSource("backup", "bkp:t:" + "a" * 32)
    with pytest.raises(Busy, match="restoring"):
        c.create("r", source=source)
    (vid,) = node.restores
    assert c.state(vid) == CREATING and vid in node.held  # made empty, being filled
    deadline = c.volumes.record(vid)[0].intent_deadline
    c.clock.now += 400  # past half the intent's time: the next retry extends it
    with pytest.raises(Busy):
        c.create("r", source=source)
    assert c.volumes.record(vid)[0].intent_deadline == c.clock.now + 600 > deadline
    node.finish_job(node.restores, vid, JobStatus(JOB_FAILED, 10, 5, 0, "pack p is missing",
                                                  "DataLoss"))
    with pytest.raises(DataLoss, match="pack p"):
        c.create("r", source=source)
    node.finish_job(node.restores, vid, DONE)
    vol = c.create("r", source=source)
    assert vol.volume_id == vid and vol.state == READY and vol.source_kind == "backup"
