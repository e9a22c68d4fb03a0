"""CSI operations on mirrored volumes in the controller, on in-memory nodes: snapshots at
one write barrier, restores and clones of and into mirrored volumes, expansion of every
replica, ModifyVolume's limits on the consumer's node, resync progress in the condition.

The nodes' side (the barrier in the frontend, copies on each node) runs for real in
tests/integration/test_cluster_mirror_ops.py."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from control import placement
from control.mirrored import QOS_KEY, QOS_VERSION_KEY
from control.node_api import (
    SOURCE_BACKUP,
    SOURCE_REPLICA,
    SOURCE_SNAPSHOT,
    SOURCE_VOLUME,
    VolumeSource,
)
from control.placement import Constraints
from control.records import DELETING, READY
from control.store import Put
from control.store_arbiter import StoreArbiter
from control.topology import TOPOLOGY_ZONE_KEY
from control.volumes import VolumeRequest
from csi.controller import ControllerService
from engine.crash import InjectedFault
from engine.errors import Busy, InvalidSpec, OutOfCapacity, Precondition, Unavailable
from engine.qos.tiers import DEFAULT_TIERS, QosSpec
from proto import csi_pb2
from tests.fake_nodes import GIB, FakeNode
from tests.unit.test_control_volumes import Cluster


@pytest.fixture
def c(tmp_path):
    nodes = [FakeNode(f"n{i}", f"z{i}") for i in (1, 2, 3, 4)]
    cluster = Cluster(str(tmp_path / "cluster.sqlite"), nodes)
    cluster.volumes.snapshot_copy_nodes = cluster.snapshots.copies_of
    cluster.journal = []  # type: ignore[attr-defined]  # every node's calls, in order
    for n in nodes:
        n._reach = _journaled(n, cluster.journal)  # type: ignore[attr-defined]
    yield cluster
    cluster.store.close()


EMPTY = VolumeSource()


def _journaled(node: FakeNode, journal: list):
    reach = node._reach

    def _reach(call: str, what: str = "") -> None:
        reach(call, what)
        journal.append((node.node_id, call, what))
    return _reach


def zone(z: str) -> dict[str, str]:
    return {TOPOLOGY_ZONE_KEY: z}


def create(c: Cluster, name: str, replicas: int = 3, zones=("z1", "z2", "z3"),
           source: VolumeSource = EMPTY, size: int = GIB, **kw):
    return c.volumes.create(VolumeRequest(
        name=name, request_hash=name, size_bytes=size, access_types=("mount",),
        replicas=replicas, source=source,
        constraints=Constraints(requisite=tuple(zone(z) for z in zones),
                                preferred=(zone(zones[0]),)), **kw))


def attach(c: Cluster, vol, node_id: str) -> dict[str, str]:
    """ControllerPublish, and the frontend then serving there (as NodeStage starts it)."""
    context = c.volumes.publish(vol.volume_id, node_id, "mount", False)
    c.nodes[node_id].frontends[vol.volume_id] = tuple(
        f"{r.node_id}@{r.node_id}:7400" for r in vol.replicas)
    return context


def calls(c: Cluster, *kinds: str) -> list[tuple[str, str, str]]:
    """(node, call, what) of these kinds, in the order they were made."""
    return [entry for entry in c.journal if entry[1] in kinds]  # type: ignore[attr-defined]


# --- snapshots -----------------------------------------------------------------------
def test_a_snapshot_of_an_unattached_volume_copies_every_in_sync_replica(c):
    vol = create(c, "v")
    snap = c.snapshots.create("s", vol.volume_id, "h")
    assert snap.state == READY and snap.mirrored
    assert sorted(snap.node_ids) == ["n1", "n2", "n3"]
    for r in snap.replicas:
        assert r.snapshot_id == snap.snapshot_id
        assert snap.snapshot_id in c.nodes[r.node_id].snapshots
    assert calls(c, "barrier_frontend") == []  # nothing writes: no barrier needed
    assert c.snapshots.create("s", vol.volume_id, "h") == snap  # a repeat: the same one
    c.snapshots.delete(snap.snapshot_id)
    assert all(snap.snapshot_id not in n.snapshots for n in c.nodes.values())
    assert c.snapshots.record(snap.snapshot_id) is None


def test_an_attached_volume_is_snapshotted_at_its_frontends_barrier(c):
    vol = create(c, "v")
    attach(c, vol, "n2")
    c.nodes["n2"].identical[vol.volume_id] = ("n1", "n2")  # n3 is being repaired
    snap = c.snapshots.create("s", vol.volume_id, "h")
    assert sorted(snap.node_ids) == ["n1", "n2"]
    assert snap.snapshot_id not in c.nodes["n3"].snapshots
    order = [(node, call) for node, call, _ in calls(
        c, "barrier_frontend", "snapshot_replica", "resume_frontend")]
    assert order[0] == ("n2", "barrier_frontend") and order[-1] == ("n2", "resume_frontend")
    assert sorted(order[1:-1]) == [("n1", "snapshot_replica"), ("n2", "snapshot_replica")]


def test_a_barrier_that_let_go_ends_the_snapshot_and_a_retry_starts_afresh(c):
    vol = create(c, "v")
    attach(c, vol, "n1")
    c.nodes["n1"].barrier_lets_go = True  # its deadline came first
    with pytest.raises(Unavailable, match="let go"):
        c.snapshots.create("s", vol.volume_id, "h")
    assert all(not n.snapshots for n in c.nodes.values())  # the copies made went
    assert c.store.get("snapshot-name/s") is None
    c.nodes["n1"].barrier_lets_go = False
    snap = c.snapshots.create("s", vol.volume_id, "h")
    assert snap.state == READY and len(snap.replicas) == 3


def test_a_replica_node_down_gets_no_copy(c):
    vol = create(c, "v")
    c.nodes["n3"].down = True
    snap = c.snapshots.create("s", vol.volume_id, "h")
    assert sorted(snap.node_ids) == ["n1", "n2"]


def test_the_consumer_node_unreachable_refuses_the_snapshot(c):
    vol = create(c, "v")
    attach(c, vol, "n1")
    c.registry.remove("n1")
    with pytest.raises(Unavailable, match="attached to n1"):
        c.snapshots.create("s", vol.volume_id, "h")
    assert all(not n.snapshots for n in c.nodes.values())


def test_replicas_left_by_a_frontend_that_died_give_one_copy(c):
    vol = create(c, "v")
    c.nodes["n2"].activity_logs[vol.volume_id] = 3
    snap = c.snapshots.create("s", vol.volume_id, "h")
    assert snap.node_ids == (vol.replicas[0].node_id,)


def test_a_node_lost_while_copying_ends_the_intent_and_its_tombstone_waits(c):
    vol = create(c, "v")
    first, second = vol.replicas[0].node_id, vol.replicas[1].node_id

    def lose_second(node: FakeNode, _snapshot_id: str) -> None:
        if node.node_id == first:
            c.nodes[second].down = True

    c.nodes[first].on_snapshot = lose_second
    c.nodes[second].fail_snapshots = True
    with pytest.raises(Unavailable):
        c.snapshots.create("s", vol.volume_id, "h")
    tombs = [s for _, s in c.store.list("snapshot/")]
    assert len(tombs) == 1 and tombs[0].value["state"] == DELETING
    assert not c.nodes[first].snapshots  # its copy went at once
    c.nodes[second].down = False
    c.reconciler.run_once()
    assert c.store.list("snapshot/") == []


def test_an_interrupted_snapshot_is_never_finished_by_a_retry(c, monkeypatch):
    vol = create(c, "v")
    monkeypatch.setenv("TANDEM_FAIL_AT", "mirror-snapshot-after-copy")
    with pytest.raises(InjectedFault):  # as a crash after the first copy
        c.snapshots.create("s", vol.volume_id, "h")
    monkeypatch.delenv("TANDEM_FAIL_AT")
    with pytest.raises(Busy, match="being taken"):  # the first call may still be running
        c.snapshots.create("s", vol.volume_id, "h")
    c.clock.now += 61
    with pytest.raises(Unavailable, match="cleared"):
        c.snapshots.create("s", vol.volume_id, "h")
    assert all(not n.snapshots for n in c.nodes.values())
    snap = c.snapshots.create("s", vol.volume_id, "h")
    assert snap.state == READY and len(snap.replicas) == 3


def test_group_snapshots_of_mirrored_volumes_are_refused(c):
    vol = create(c, "v")
    with pytest.raises(Precondition, match="mirrored"):
        c.snapshots.create_group("g", [vol.volume_id], "h")


# --- restores and clones -------------------------------------------------------------
def test_a_restore_into_more_replicas_copies_where_copies_are_and_rebuilds_the_rest(c):
    vol = create(c, "v", replicas=2, zones=("z1", "z2", "z3"))
    snap = c.snapshots.create("s", vol.volume_id, "h")
    source = VolumeSource(SOURCE_SNAPSHOT, snap.snapshot_id)
    restored = create(c, "r", replicas=3, zones=("z3", "z1", "z2"), source=source)
    assert {r.node_id for r in restored.replicas} == {"n1", "n2", "n3"}
    assert restored.source_kind == "snapshot"
    states = StoreArbiter(c.store).get(restored.volume_id).replicas
    for node_id in snap.node_ids:  # copy-on-write from the copy on that node: in sync
        assert c.nodes[node_id].made_from[restored.volume_id] == source
        assert states[node_id] == "in_sync"
    assert restored.volume_id in c.nodes["n3"].rebuilding  # empty, copied by the frontend
    assert states["n3"] == "out_of_sync"


def test_a_local_snapshot_restores_into_a_mirrored_volume(c):
    local = c.create("l", constraints=Constraints(requisite=(zone("z2"),)))
    snap = c.snapshots.create("s", local.volume_id, "h")
    source = VolumeSource(SOURCE_SNAPSHOT, snap.snapshot_id)
    two = create(c, "two", replicas=2, zones=("z1", "z2", "z3"), source=source)
    assert "n2" in {r.node_id for r in two.replicas}
    assert c.nodes["n2"].made_from[two.volume_id] == source
    # three replicas want two in sync before any write: one copy is not enough
    with pytest.raises(Precondition, match="minInSync"):
        create(c, "three", source=source)
    three = create(c, "three-1", source=source, min_in_sync=1)
    assert sum(1 for r in three.replicas if three.volume_id in c.nodes[r.node_id].rebuilding) == 2


def test_a_local_volume_from_a_mirrored_snapshot_goes_where_a_copy_is(c):
    vol = create(c, "v", replicas=2, zones=("z1", "z2", "z3"))
    snap = c.snapshots.create("s", vol.volume_id, "h")
    c.nodes["n1"].free_bytes = 0  # no room beside the first copy: the second one
    local = c.create("l", source=VolumeSource(SOURCE_SNAPSHOT, snap.snapshot_id))
    assert local.node_id in snap.node_ids and local.node_id != "n1"
    assert not local.mirrored


def test_a_clone_of_an_attached_mirrored_volume_copies_its_replicas_at_one_barrier(c):
    vol = create(c, "v")
    attach(c, vol, "n1")
    c.nodes["n1"].identical[vol.volume_id] = ("n1", "n2", "n3")
    source = VolumeSource(SOURCE_VOLUME, vol.volume_id)
    clone = create(c, "c", replicas=2, source=source)
    for r in clone.replicas:
        assert c.nodes[r.node_id].made_from[clone.volume_id] == VolumeSource(
            SOURCE_REPLICA, vol.volume_id)
    assert set(StoreArbiter(c.store).get(clone.volume_id).replicas.values()) == {"in_sync"}
    tokens = [what for _, _, what in calls(c, "barrier_frontend")]
    assert tokens == [f"{vol.volume_id}:{clone.volume_id}"]


def test_a_clone_whose_barrier_let_go_is_ended_and_made_again_on_retry(c):
    vol = create(c, "v")
    attach(c, vol, "n1")
    c.nodes["n1"].barrier_lets_go = True
    with pytest.raises(Unavailable, match="let go"):
        create(c, "c", replicas=2, source=VolumeSource(SOURCE_VOLUME, vol.volume_id))
    assert c.store.get("volume-name/c") is None  # the intent ended, its replicas went
    held = {n.node_id: set(n.held) for n in c.nodes.values()}
    assert all(held[n] == ({vol.volume_id} if n in vol.node_ids else set()) for n in held)
    c.nodes["n1"].barrier_lets_go = False
    clone = create(c, "c", replicas=2, source=VolumeSource(SOURCE_VOLUME, vol.volume_id))
    assert clone.state == READY


def test_a_local_clone_of_a_mirrored_volume_copies_one_identical_replica(c):
    vol = create(c, "v", replicas=2, zones=("z1", "z2", "z3"))
    local = c.create("l", source=VolumeSource(SOURCE_VOLUME, vol.volume_id))
    assert local.node_id in vol.node_ids and not local.mirrored
    assert c.nodes[local.node_id].made_from[local.volume_id] == VolumeSource(
        SOURCE_REPLICA, vol.volume_id)


def test_a_mirrored_clone_of_a_local_volume(c):
    local = c.create("l", constraints=Constraints(requisite=(zone("z3"),)))
    clone = create(c, "c", replicas=2, zones=("z1", "z2", "z3"),
                   source=VolumeSource(SOURCE_VOLUME, local.volume_id))
    assert "n3" in clone.node_ids
    assert c.nodes["n3"].made_from[clone.volume_id] == VolumeSource(SOURCE_VOLUME,
                                                                     local.volume_id)
    other = next(n for n in clone.node_ids if n != "n3")
    assert clone.volume_id in c.nodes[other].rebuilding


def test_a_restore_with_no_copy_node_reachable_is_refused(c):
    vol = create(c, "v", replicas=2, zones=("z1", "z2", "z3"))
    snap = c.snapshots.create("s", vol.volume_id, "h")
    for node_id in snap.node_ids:
        c.registry.remove(node_id)
    with pytest.raises((Unavailable, OutOfCapacity)):
        create(c, "r", replicas=2, zones=("z3", "z4"),
               source=VolumeSource(SOURCE_SNAPSHOT, snap.snapshot_id))


# --- expansion, tiers, condition -----------------------------------------------------
def test_expansion_grows_every_replica_or_nothing_when_one_is_away(c):
    vol = create(c, "v")
    c.nodes["n3"].down = True
    with pytest.raises(Unavailable, match="n3"):
        c.volumes.expand(vol.volume_id, 2 * GIB)
    assert c.volumes.require_ready(vol.volume_id)[0].capacity_bytes == GIB
    assert all(c.nodes[n].held[vol.volume_id].size_bytes == GIB for n in ("n1", "n2"))
    c.nodes["n3"].down = False
    grown = c.volumes.expand(vol.volume_id, 2 * GIB)
    assert grown.capacity_bytes == 2 * GIB
    for r in vol.replicas:
        assert c.nodes[r.node_id].held[vol.volume_id].size_bytes == 2 * GIB
        assert c.index.provisioned_bytes(r.node_id) == 2 * GIB


def test_modify_sets_the_limits_on_the_consumers_node(c):
    vol = create(c, "v", zones=("z1", "z2", "z3", "z4"), remote_access=True)
    context = attach(c, vol, "n4")  # a pod beyond the replicas' zones
    assert QosSpec.from_json(context[QOS_KEY]) == QosSpec()
    assert int(context[QOS_VERSION_KEY]) > 0
    c.volumes.modify(vol.volume_id, {"tier": "gold"},
                     lambda _p, m: DEFAULT_TIERS[m["tier"]])
    qos, version = c.nodes["n4"].frontend_qos[vol.volume_id]
    assert qos == DEFAULT_TIERS["gold"] and version > int(context[QOS_VERSION_KEY])
    for r in vol.replicas:  # and the replicas' records (their minima are admitted there)
        assert c.nodes[r.node_id].held[vol.volume_id].qos == DEFAULT_TIERS["gold"]


def test_modify_admits_a_raised_minimum_on_every_replicas_node_or_changes_nothing(c):
    vol = create(c, "v")  # the default tier: no minimum
    before = c.volumes.require_ready(vol.volume_id)[0]
    gold = DEFAULT_TIERS["gold"]  # 4,000 guaranteed IOPS
    # n3 holds a replica: first its whole capacity is below the minimum, then 2,500 of its
    # 6,000 guaranteed IOPS are taken by another volume
    c.nodes["n3"].iops_capacity = 3000
    c.registry.forget_info("n3")
    with pytest.raises(InvalidSpec, match="whole capacity of 3000"):
        c.volumes.modify(vol.volume_id, {"tier": "gold"}, lambda _p, m: DEFAULT_TIERS[m["tier"]])
    c.nodes["n3"].iops_capacity = 6000
    c.registry.forget_info("n3")
    c.index.note("vol-other", replace(before, volume_id="vol-other", node_id="n3", replicas=(),
                                      qos=QosSpec("busy", 1250, 1250)), 1)
    with pytest.raises(OutOfCapacity, match="3500 of 6000 free"):
        c.volumes.modify(vol.volume_id, {"tier": "gold"}, lambda _p, m: DEFAULT_TIERS[m["tier"]])
    after = c.volumes.require_ready(vol.volume_id)[0]
    assert after.qos == before.qos and after.mutable_parameters == before.mutable_parameters
    for r in vol.replicas:  # no replica's node was told
        assert c.nodes[r.node_id].held[vol.volume_id].qos != gold


def test_the_condition_shows_a_resyncs_progress(c):
    vol = create(c, "v")
    arbiter = StoreArbiter(c.store)
    rec = arbiter.get(vol.volume_id)
    arbiter.compare_and_set(rec.with_replica("n3", "out_of_sync"), rec.version)
    service = ControllerService(None, c.volumes, c.snapshots, None,  # type: ignore[arg-type]
                                c.registry, c.index)
    cond = service._mirrored_condition(c.volumes.require_ready(vol.volume_id)[0])
    assert cond.abnormal and "n3 (z3): out_of_sync" in cond.message
    c.store.commit([Put(f"frontend/{vol.volume_id}", {
        "node_id": "n1", "generation": 1, "state": "serving", "replicas": {
            "n1": {"state": "in_sync", "connected": True, "resync_done_bytes": 0,
                   "resync_total_bytes": 0},
            "n3": {"state": "resyncing", "connected": True,
                   "resync_done_bytes": 42 * 65536, "resync_total_bytes": 100 * 65536}}})])
    cond = service._mirrored_condition(c.volumes.require_ready(vol.volume_id)[0])
    assert cond.abnormal and "n3 (z3): resyncing 42%" in cond.message
    assert "n1 (z1): in_sync" in cond.message


def test_backups_and_mirrored_volumes_are_refused_with_the_way_round(c):
    vol = create(c, "v")
    with pytest.raises(Precondition, match="backup"):
        c.snapshots.create("s", vol.volume_id, "h", backup_target="offsite")
    assert c.store.get("snapshot-name/s") is None
    with pytest.raises(Precondition, match="replicas: 1"):
        create(c, "r", source=VolumeSource(SOURCE_BACKUP, "bk-1"))


def test_get_capacity_for_three_replicas_through_csi(c):
    """A zone's capacity for `replicas: 3` is the smaller of its own and the second best
    of the other zones; nodes that cannot keep the tier's minimum count as nothing."""
    for node_id, free in (("n2", 30 * GIB), ("n3", 60 * GIB), ("n4", 80 * GIB)):
        c.nodes[node_id].free_bytes = free
    c.nodes["n4"].iops_capacity = 3000  # cannot keep gold's 4,000 guaranteed IOPS
    config = SimpleNamespace(overcommit_ratio=1.0, tiers=DEFAULT_TIERS)
    service = ControllerService(config,  # type: ignore[arg-type]
                                c.volumes, c.snapshots, None, c.registry, c.index)

    def capacity(zone_name: str, **params: str) -> int:
        req = csi_pb2.GetCapacityRequest(parameters={"replicas": "3", **params},
                                         accessible_topology=csi_pb2.Topology(
                                             segments=zone(zone_name)))
        return service.GetCapacity(req, None).available_capacity

    def available(node_id: str) -> int:
        return placement.available_bytes(c.registry.info(node_id), c.index, 1.0)

    assert capacity("z1") == available("n3")  # n4 and n3 the best others: n3 second
    assert capacity("z1", tier="gold") == available("n2")  # n4 out: n3 and n2 left
    assert capacity("z2") == available("n2")  # its own zone is the smallest
    assert available("n2") < available("n3") < available("n4")
