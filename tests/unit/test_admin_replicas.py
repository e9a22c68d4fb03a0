"""`tandem-admin replicas` over a cluster store on SQLite (the records a cluster writes:
the volume, the arbiter's, the serving frontend's report, the nodes' registrations)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from control.records import READY, ReplicaPlacement, VolumeRecord
from control.registration import NODE
from control.sqlite_store import SqliteStore
from control.store import Put
from control.store_arbiter import key as arbiter_key
from csi import admin

MIB = 1024 * 1024
VOLUME_ID = "vol-" + "a" * 32
LOCAL_ID = "vol-" + "b" * 32


def volume(volume_id: str, replicas: tuple[ReplicaPlacement, ...]) -> VolumeRecord:
    return VolumeRecord(
        volume_id=volume_id, name=volume_id[-4:], request_hash="h", state=READY,
        capacity_bytes=64 * MIB, node_id="node-z1", zone="zone-1", access_types=("block",),
        parameters={}, mutable_parameters={}, capabilities=(("block", "SINGLE_NODE_WRITER",
                                                              ""),),
        created_mutable_parameters={}, created_bytes=64 * MIB, replicas=replicas,
        min_in_sync=2 if replicas else 0)


@pytest.fixture
def store_url(tmp_path):
    path = tmp_path / "cluster.sqlite"
    store = SqliteStore(str(path))
    placements = tuple(ReplicaPlacement(f"node-z{z}", f"zone-{z}") for z in (1, 2, 3))
    mirrored = volume(VOLUME_ID, placements)
    store.commit([
        Put(f"volume/{VOLUME_ID}", mirrored.to_value()),
        Put(f"volume/{LOCAL_ID}", replace(volume(LOCAL_ID, ()), name="local").to_value()),
        Put(arbiter_key(VOLUME_ID), {"volume_id": VOLUME_ID, "generation": 4, "owner": "fe",
                                     "replicas": {"node-z1": "in_sync", "node-z2": "in_sync",
                                                  "node-z3": "out_of_sync"}}),
        # the frontend on node-z1 copies to node-z3, a quarter done; node-z2 is not registered
        Put(f"frontend/{VOLUME_ID}", {
            "node_id": "node-z1", "generation": 4, "state": "serving",
            "replicas": {"node-z1": {"state": "in_sync", "connected": True},
                         "node-z2": {"state": "in_sync", "connected": True},
                         "node-z3": {"state": "resyncing", "connected": True,
                                     "resync_done_bytes": 16 * MIB,
                                     "resync_total_bytes": 64 * MIB}}}),
        Put(NODE + "node-z1", {"node_id": "node-z1"}),
        Put(NODE + "node-z3", {"node_id": "node-z3"}),
    ])
    store.close()
    return f"sqlite:{path}"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = admin.main(["replicas", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_each_replica_with_its_progress_and_node(store_url, capsys):
    code, out, _ = run(capsys, "--store", store_url)
    assert code == 0
    rows = json.loads(out)
    assert [r["volume_id"] for r in rows] == [VOLUME_ID]  # only mirrored volumes
    row = rows[0]
    assert row["frontend"] == {"node_id": "node-z1", "generation": 4, "state": "serving"}
    by_node = {r["node_id"]: r for r in row["replicas"]}
    assert by_node["node-z1"]["summary"] == "in_sync"
    assert by_node["node-z2"]["summary"] == "in_sync, node down"
    assert by_node["node-z2"]["node_up"] is False
    assert by_node["node-z3"]["resync_percent"] == 25
    assert by_node["node-z3"]["summary"] == "resyncing 25%"
    assert row["abnormal"] is True
    assert row["condition"] == ("replicas: node-z1 (zone-1): in_sync; node-z2 (zone-2): "
                                "in_sync, node down; node-z3 (zone-3): resyncing 25%")


def test_one_volume_by_id_and_an_unknown_one(store_url, capsys):
    code, out, _ = run(capsys, VOLUME_ID, "--store", store_url)
    assert code == 0 and len(json.loads(out)) == 1
    code, _, err = run(capsys, "vol-" + "c" * 32, "--store", store_url)
    assert code == 1 and "no such volume" in err


def test_a_bad_store_is_a_clear_error(capsys):
    code, _, err = run(capsys, "--store", "sqlite:relative.db")
    assert code == 2 and "absolute path" in err
