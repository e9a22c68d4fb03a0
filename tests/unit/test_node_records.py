"""Node-local records (engine/node_records.py): typed values over the JSON layout that nodes
already hold. Nodes upgrade in place, so the rows below, exactly as the previous release
wrote them (its SqliteStore: json.dumps with sorted keys), must read back, and writing the
typed value back must give the same bytes."""

import sqlite3

import pytest

from engine.node_records import (
    DONE,
    PENDING,
    FreezeRecord,
    NodeRecords,
    PublishRecord,
    StageRecord,
    format_device,
)
from engine.state import SqliteStore

# (kind, key, data) as the previous release wrote them for a mount volume published to a
# pod, and a block volume published read-only (its own read-only loop device)
TODAYS_ROWS = [
    ("stage", "vol-m",
     '{"access_type": "mount", "fs_type": "ext4", "mount_flags": ["noatime"], '
     '"read_only": false, "staging_path": "/k/st/m", "state": "done"}'),
    ("stage", "vol-b",
     '{"access_type": "block", "fs_type": "", "mount_flags": [], "read_only": false, '
     '"staging_path": "/k/st/b", "state": "done"}'),
    ("publish", "vol-m|/k/pub/m1",
     '{"access_type": "mount", "device": "7:12", "pod_uid": "pod-1", "read_only": false, '
     '"ro_device": "", "state": "done", "target": "/k/pub/m1", "volume_id": "vol-m"}'),
    ("publish", "vol-b|/k/pub/b1",
     '{"access_type": "block", "device": "7:13", "pod_uid": "", "read_only": true, '
     '"ro_device": "/dev/loop13", "state": "done", "target": "/k/pub/b1", '
     '"volume_id": "vol-b"}'),
    # an intent: the device is not known (nor written) until the publish is done
    ("publish", "vol-b|/k/pub/b2",
     '{"access_type": "block", "pod_uid": "pod-2", "read_only": false, "ro_device": "", '
     '"state": "pending", "target": "/k/pub/b2", "volume_id": "vol-b"}'),
    ("freeze", "/k/st/m", '{"at": 1700000000.25, "pid": 4242}'),
]


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "state.sqlite")


@pytest.fixture
def store(path):
    s = SqliteStore(path)
    yield s
    s.close()


def write_raw(path, rows):
    """Rows straight into the table, as an older driver left them."""
    with sqlite3.connect(path) as conn:
        conn.executemany("INSERT OR REPLACE INTO records(kind, key, schema, data) "
                         "VALUES (?,?,1,?)", rows)


def read_raw(path):
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT kind, key, data FROM records ORDER BY kind, key").fetchall()


def test_todays_records_read_back_typed(store, path):
    write_raw(path, TODAYS_ROWS)
    records = NodeRecords(store)

    assert records.get_stage("vol-m") == StageRecord(
        "vol-m", "/k/st/m", "mount", read_only=False, fs_type="ext4",
        mount_flags=("noatime",), state=DONE)
    assert records.get_stage("vol-b").access_type == "block"
    assert [s.volume_id for s in records.list_stages()] == ["vol-b", "vol-m"]

    assert records.get_publish("vol-m", "/k/pub/m1") == PublishRecord(
        "vol-m", "/k/pub/m1", "mount", read_only=False, ro_device="", pod_uid="pod-1",
        device=(7, 12), state=DONE)
    b1, b2 = records.publishes_of("vol-b")
    assert (b1.target, b1.read_only, b1.ro_device, b1.device) == (
        "/k/pub/b1", True, "/dev/loop13", (7, 13))
    assert (b2.target, b2.pod_uid, b2.device, b2.state, b2.done) == (
        "/k/pub/b2", "pod-2", None, PENDING, False)
    assert format_device(b1.device) == "7:13" and format_device(b2.device) == ""

    assert records.list_freezes() == [FreezeRecord("/k/st/m", 1700000000.25, 4242)]


def test_todays_records_write_back_byte_for_byte(store, path):
    """An older driver (a downgrade, or tandem-admin of another release) reads what this
    one writes."""
    write_raw(path, TODAYS_ROWS)
    before = read_raw(path)
    records = NodeRecords(store)
    stages, publishes = records.list_stages(), records.list_publishes()
    freezes = records.list_freezes()
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM records")
    for stage in stages:
        records.put_stage(stage)
    for publish in publishes:
        records.put_publish(publish)
    for freeze in freezes:
        records.put_freeze(freeze)
    assert read_raw(path) == before == sorted((k, key, d) for k, key, d in TODAYS_ROWS)


def test_records_from_before_later_fields_read_with_their_defaults(store, path):
    write_raw(path, [
        # mount_flags was not kept by the first releases
        ("stage", "vol-old", '{"access_type": "mount", "fs_type": "xfs", "read_only": true, '
                             '"staging_path": "/k/st/old", "state": "done"}'),
        # nor pod_uid, ro_device or device, as far as a reader is concerned
        ("publish", "vol-old|/k/pub/old",
         '{"access_type": "mount", "read_only": true, "state": "done", '
         '"target": "/k/pub/old", "volume_id": "vol-old"}'),
        ("freeze", "/k/st/old", "{}"),
    ])
    records = NodeRecords(store)
    assert records.get_stage("vol-old") == StageRecord(
        "vol-old", "/k/st/old", "mount", read_only=True, fs_type="xfs", mount_flags=(),
        state=DONE)
    assert records.get_publish("vol-old", "/k/pub/old") == PublishRecord(
        "vol-old", "/k/pub/old", "mount", read_only=True, ro_device="", pod_uid="",
        device=None, state=DONE)
    assert records.list_freezes() == [FreezeRecord("/k/st/old", 0.0, 0)]


@pytest.mark.parametrize("kind, key, data, message", [
    ("stage", "vol-1", '{"access_type": "mount", "read_only": false, "state": "done"}',
     "stage record 'vol-1' has no 'staging_path' field"),
    ("publish", "vol-1|/t", '{"volume_id": "vol-1", "target": "/t", "access_type": "mount", '
                            '"state": "done"}',
     "publish record 'vol-1|/t' has no 'read_only' field"),
    ("stage", "vol-1", '{"access_type": "mount", "read_only": false, "staging_path": "/s", '
                       '"state": "half"}',
     "'half' is not a valid RecordState"),
])
def test_a_damaged_record_is_a_clear_error(store, path, kind, key, data, message):
    write_raw(path, [(kind, key, data)])
    records = NodeRecords(store)
    read = {"stage": lambda: records.get_stage("vol-1"),
            "publish": lambda: records.list_publishes()}[kind]
    with pytest.raises(ValueError, match=message):
        read()


def test_publish_keys_are_volume_bar_normalised_target_and_listed_by_volume(store):
    records = NodeRecords(store)
    for volume_id, target in [("vol-1", "/k/pub/a"), ("vol-1", "/k/pub/b"),
                              ("vol-10", "/k/pub/c")]:
        records.put_publish(PublishRecord(volume_id, target, "mount", read_only=False))
    assert {k for k, _ in store.list("publish")} == {
        "vol-1|/k/pub/a", "vol-1|/k/pub/b", "vol-10|/k/pub/c"}
    # vol-10 is not one of vol-1's, though its ID starts with vol-1
    assert [p.target for p in records.publishes_of("vol-1")] == ["/k/pub/a", "/k/pub/b"]
    assert records.get_publish("vol-1", "/k//pub/a/").target == "/k/pub/a"
    records.delete_publish("vol-1", "/k/pub//a/")
    assert sorted(p.target for p in records.list_publishes()) == ["/k/pub/b", "/k/pub/c"]
    assert records.get_publish("vol-1", "/k/pub/a") is None


def test_stage_and_freeze_put_get_delete(store):
    records = NodeRecords(store)
    stage = StageRecord("vol-1", "/k/st/1", "block", read_only=False)
    assert records.get_stage("vol-1") is None
    records.put_stage(stage)
    assert records.get_stage("vol-1") == stage and stage.state is PENDING and not stage.done
    records.delete_stage("vol-1")
    records.delete_stage("vol-1")  # idempotent
    assert records.get_stage("vol-1") is None and records.list_stages() == []

    records.put_freeze(FreezeRecord("/k/st/1", frozen_at=12.5, pid=7))
    assert records.list_freezes() == [FreezeRecord("/k/st/1", 12.5, 7)]
    records.delete_freeze("/k/st/1")
    assert records.list_freezes() == []
