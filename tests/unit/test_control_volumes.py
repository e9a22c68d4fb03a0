"""Controller logic on several in-memory nodes, without root: placement, admission,
idempotency, the intent protocol, paging, and the answers for unreachable nodes."""

from __future__ import annotations

import threading
import time

import pytest

from control.node_api import NewVolume, StaleVersion, VolumeSource
from control.placement import Constraints
from control.reconcile import Reconciler
from control.records import CREATING, DELETING, READY, VOLUME
from control.registry import NodeRegistry
from control.snapshots import Snapshots
from control.sqlite_store import SqliteStore
from control.store import Delete
from control.tombstones import TombstoneSweeper
from control.topology import TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY
from control.volume_index import VolumeIndex
from control.volumes import VolumePolicy, VolumeRequest, Volumes
from engine.errors import (
    AlreadyExists,
    Busy,
    InUse,
    InvalidSpec,
    NotFound,
    OutOfCapacity,
    Precondition,
    Unavailable,
)
from engine.locks import KeyLocks
from engine.qos.tiers import DEFAULT_TIERS, QosSpec
from tests.fake_nodes import GIB, FakeNode

NO_QOS, ANYWHERE, EMPTY = QosSpec(), Constraints(), VolumeSource()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Cluster:
    """A controller's control plane over fake nodes and a real (SQLite) store."""

    def __init__(self, path: str, nodes: list[FakeNode], store: SqliteStore | None = None,
                 **policy):
        self.store = store or SqliteStore(path)
        self.clock = Clock()
        self.registry = NodeRegistry(info_ttl_s=0)
        self.nodes = {n.node_id: n for n in nodes}
        for n in nodes:
            self.registry.add(n)
        self.index = VolumeIndex()
        for key, got in self.store.list(VOLUME):
            self.index.note_value(key, got.value, got.version)
        locks = KeyLocks()
        self.volumes = Volumes(self.store, self.registry, self.index, VolumePolicy(**policy),
                               locks, clock=self.clock)
        self.snapshots = Snapshots(self.store, self.registry, self.volumes, locks,
                                   clock=self.clock)
        self.volumes.snapshot_source = self.snapshots.source_of
        self.reconciler = Reconciler(self.store, self.registry, self.volumes, self.snapshots,
                                     self.clock)

    def create(self, name: str, size: int = GIB, qos: QosSpec = NO_QOS, digest: str = "h",
               constraints: Constraints = ANYWHERE, source: VolumeSource = EMPTY,
               secrets: dict[str, str] | None = None):
        return self.volumes.create(VolumeRequest(
            name=name, request_hash=digest, size_bytes=size, access_types=("mount",),
            qos=qos, constraints=constraints, source=source,
            secrets=secrets or {"accessKeyId": "AK", "secretAccessKey": "SK",
                                "encryptionKey": "k" * 40}))

    def state(self, volume_id: str) -> str | None:
        found = self.volumes.record(volume_id)
        return found[0].state if found else None


@pytest.fixture
def three_zones(tmp_path):
    nodes = [FakeNode(f"n{i}", f"zone-{i}") for i in (1, 2, 3)]
    cluster = Cluster(str(tmp_path / "cluster.sqlite"), nodes)
    yield cluster
    cluster.store.close()


def zone(z: str) -> dict[str, str]:
    return {TOPOLOGY_ZONE_KEY: z}


# --- placement and admission -------------------------------------------------------
def test_preferred_topology_wins_and_requisite_limits(three_zones):
    c = three_zones
    vol = c.create("a", constraints=Constraints(requisite=(zone("zone-2"), zone("zone-3")),
                                                preferred=(zone("zone-3"),)))
    assert vol.node_id == "n3" and vol.zone == "zone-3"
    vol = c.create("b", constraints=Constraints(requisite=(zone("zone-2"),)))
    assert vol.node_id == "n2"
    with pytest.raises(OutOfCapacity, match="accessibility"):
        c.create("c", constraints=Constraints(requisite=(zone("zone-9"),)))


def test_capacity_exhaustion_names_each_node(tmp_path):
    nodes = [FakeNode("n1", "z1", free_bytes=3 * GIB), FakeNode("n2", "z2", free_bytes=3 * GIB)]
    c = Cluster(str(tmp_path / "s.sqlite"), nodes, overcommit_ratio=1.0)
    c.create("a", size=2 * GIB - 1024 * 1024)
    c.create("b", size=2 * GIB - 1024 * 1024)
    with pytest.raises(OutOfCapacity) as err:
        c.create("c", size=2 * GIB)
    assert "n1" in str(err.value) and "n2" in str(err.value)


def test_guaranteed_iops_spread_over_nodes(three_zones):
    c = three_zones
    gold = DEFAULT_TIERS["gold"]  # 4,000 guaranteed of each node's 10,000
    placed = [c.create(f"g{i}", qos=gold).node_id for i in range(6)]
    assert sorted(placed) == ["n1", "n1", "n2", "n2", "n3", "n3"]
    with pytest.raises(OutOfCapacity, match="guaranteed IOPS"):
        c.create("g6", qos=gold)


def test_intents_and_tombstones_count_against_capacity(tmp_path):
    node = FakeNode("n1", "z1", free_bytes=4 * GIB)
    c = Cluster(str(tmp_path / "s.sqlite"), [node], overcommit_ratio=1.0)
    node.fail_creates = True
    with pytest.raises(Unavailable):
        c.create("a", size=2 * GIB)  # the intent stays, holding its bytes
    node.fail_creates = False
    with pytest.raises(OutOfCapacity):
        c.create("b", size=2 * GIB)


# --- idempotency and the intent protocol ------------------------------------------
def test_same_request_same_volume_other_request_already_exists(three_zones):
    c = three_zones
    first = c.create("a", digest="one")
    assert c.create("a", digest="one").volume_id == first.volume_id
    with pytest.raises(AlreadyExists):
        c.create("a", digest="two")


def test_retry_after_node_failure_finishes_the_same_intent(three_zones):
    c = three_zones
    c.nodes["n1"].fail_creates = True
    with pytest.raises(Unavailable):
        c.create("a", constraints=Constraints(requisite=(zone("zone-1"),)))
    (key, got), = c.store.list(VOLUME)  # the intent exists, no storage
    assert got.value["state"] == CREATING
    volume_id = got.value["volume_id"]
    assert volume_id not in c.nodes["n1"].held
    c.nodes["n1"].fail_creates = False
    vol = c.create("a", constraints=Constraints(requisite=(zone("zone-1"),)))
    assert vol.volume_id == volume_id and vol.state == READY
    assert volume_id in c.nodes["n1"].held


def test_a_node_that_refuses_ends_the_intent_at_once(three_zones):
    c = three_zones
    for n in c.nodes.values():
        n.refuse_creates = True
    with pytest.raises(Precondition):
        c.create("a")
    assert c.store.list(VOLUME) == []  # no intent lingers until its deadline
    for n in c.nodes.values():
        n.refuse_creates = False
    assert c.create("a").state == READY  # the name is free for a new try


def test_listing_hides_intents_and_tombstones(three_zones):
    c = three_zones
    ready = [c.create(f"r{i}").volume_id for i in range(5)]
    for n in c.nodes.values():
        n.fail_creates = True
    with pytest.raises(Unavailable):
        c.create("pending")
    for n in c.nodes.values():
        n.fail_creates = False
    page, last = c.volumes.list_ready("", 2)
    seen = [v.volume_id for v in page]
    while last:
        page, last = c.volumes.list_ready(last, 2)
        seen += [v.volume_id for v in page]
    assert sorted(seen) == sorted(ready)


def test_expired_intent_becomes_a_tombstone_and_its_storage_goes(three_zones):
    c = three_zones
    node = c.nodes["n1"]
    # a create that made storage and then lost its controller before confirming
    original = c.volumes._realize
    c.volumes._realize = lambda record, version, *_: (_ for _ in ()).throw(Unavailable("crash"))
    with pytest.raises(Unavailable):
        c.create("a", constraints=Constraints(requisite=(zone("zone-1"),)))
    c.volumes._realize = original
    (_, got), = c.store.list(VOLUME)
    volume_id = got.value["volume_id"]
    node.create_volume(NewVolume(volume_id, GIB, ("mount",), version=got.version))
    c.reconciler.run_once()  # not yet expired: untouched
    assert c.state(volume_id) == CREATING and volume_id in node.held
    c.clock.now += 3600
    c.reconciler.run_once()
    assert c.state(volume_id) is None and volume_id not in node.held
    # the name is free again, for a new ID
    assert c.create("a").volume_id != volume_id


def test_storage_without_a_record_is_reported_never_deleted(three_zones, tmp_path):
    c = three_zones
    kept = c.create("kept")
    # the store is restored from a backup older than this volume: its record is lost
    lost = c.create("lost")
    c.store.commit([Delete(VOLUME + lost.volume_id)])
    orphans = c.reconciler.run_once()
    assert orphans.volumes == {lost.node_id: [lost.volume_id]}
    assert lost.volume_id in c.nodes[lost.node_id].held
    assert kept.volume_id in c.nodes[kept.node_id].held


def test_an_empty_store_deletes_nothing(tmp_path):
    nodes = [FakeNode("n1", "z1")]
    c = Cluster(str(tmp_path / "a.sqlite"), nodes)
    ids = [c.create(f"v{i}").volume_id for i in range(3)]
    c.store.close()
    fresh = Cluster(str(tmp_path / "b.sqlite"), nodes)  # the store's view lost
    orphans = fresh.reconciler.run_once()
    assert sorted(orphans.volumes["n1"]) == sorted(ids)
    assert sorted(nodes[0].held) == sorted(ids)
    fresh.store.close()


# --- delete -------------------------------------------------------------------------
def test_delete_on_a_down_node_keeps_a_tombstone_until_it_returns(three_zones):
    c = three_zones
    vol = c.create("a")
    node = c.nodes[vol.node_id]
    node.down = True
    c.registry.remove(node.node_id)  # the registry lost it (agent gone)
    c.volumes.delete(vol.volume_id)  # OK to the CO: the tombstone converges later
    assert c.state(vol.volume_id) == DELETING
    assert c.volumes.list_ready("", 0)[0] == []
    node.down = False
    c.registry.add(node)
    c.reconciler.run_once()
    assert c.state(vol.volume_id) is None and vol.volume_id not in node.held
    c.volumes.delete(vol.volume_id)  # idempotent


def tombstone_on_a_down_node(c: Cluster, name: str):
    """A volume deleted while its node is away: its tombstone waits for the node."""
    vol = c.create(name)
    node = c.nodes[vol.node_id]
    node.down = True
    c.registry.remove(node.node_id)
    c.volumes.delete(vol.volume_id)
    assert c.state(vol.volume_id) == DELETING
    return vol, node


def test_a_repeated_delete_while_the_tombstone_converges_elsewhere_is_ok(three_zones):
    # The reconciler (or the first DeleteVolume) holds the volume while it converges the
    # tombstone: a repeat waits for it a little and then answers OK, not ABORTED.
    c = three_zones
    vol, node = tombstone_on_a_down_node(c, "a")
    started = time.monotonic()
    with c.volumes.locks.hold(vol.volume_id):  # the reconciler's round
        c.volumes.delete(vol.volume_id)
    assert time.monotonic() - started >= 4.9  # it waited for the holder first
    assert c.state(vol.volume_id) == DELETING  # and the tombstone still converges later
    node.down = False
    c.registry.add(node)
    # a live volume stays ABORTED while another call holds it (no silent OK)
    live = c.create("b")
    with c.volumes.locks.hold(live.volume_id):
        with pytest.raises(Busy):
            c.volumes.delete(live.volume_id)
    assert c.state(live.volume_id) == READY
    c.reconciler.run_once()
    assert c.state(vol.volume_id) is None and vol.volume_id not in node.held


def test_unpublish_of_a_converging_tombstone_is_ok_at_once(three_zones):
    # The CO's cleanup after DeleteVolume (ControllerUnpublish) must not be ABORTED while
    # the reconciler converges the tombstone: a tombstone has nothing attached.
    c = three_zones
    vol, _ = tombstone_on_a_down_node(c, "a")
    started = time.monotonic()
    with c.volumes.locks.hold(vol.volume_id):  # the reconciler's round
        c.volumes.unpublish(vol.volume_id, vol.node_id)
        c.volumes.unpublish(vol.volume_id, "")
    assert time.monotonic() - started < 1.0
    live = c.create("b")
    with c.volumes.locks.hold(live.volume_id):  # a live volume stays ABORTED
        with pytest.raises(Busy):
            c.volumes.unpublish(live.volume_id, live.node_id)


def test_a_repeated_snapshot_delete_while_its_tombstone_converges_elsewhere_is_ok(
        three_zones):
    c = three_zones
    vol = c.create("a")
    snap = c.snapshots.create("s", vol.volume_id, "h")
    live = c.snapshots.create("t", vol.volume_id, "h2")
    node = c.nodes[vol.node_id]
    node.down = True
    c.registry.remove(node.node_id)
    assert c.snapshots.delete(snap.snapshot_id)  # a tombstone, converging later
    started = time.monotonic()
    with c.snapshots.locks.hold(snap.snapshot_id):  # the reconciler's round
        assert c.snapshots.delete(snap.snapshot_id)
    assert time.monotonic() - started >= 4.9  # it waited for the holder first
    with c.snapshots.locks.hold(live.snapshot_id):  # a live one stays ABORTED
        with pytest.raises(Busy):
            c.snapshots.delete(live.snapshot_id)
    node.down = False
    c.registry.add(node)
    c.reconciler.run_once()
    assert c.snapshots.record(snap.snapshot_id) is None
    assert c.snapshots.record(live.snapshot_id) is not None


def test_a_tombstone_whose_sweep_failed_is_swept_by_the_reconciler(three_zones, monkeypatch):
    # The node removed the storage, then the store lost its quorum before the sweeper
    # removed the tombstone: the reconciler sweeps it later (without the node call).
    c = three_zones
    sweeper = TombstoneSweeper(c.store, lambda key, rev: c.index.note_value(key, None, rev))
    sweeper.close()  # its thread ends: the test sweeps by hand (flush), at known moments
    c.volumes.sweeper = sweeper
    vol = c.create("a")
    node = c.nodes[vol.node_id]
    commit = c.store.commit

    def no_quorum_for_deletes(ops):  # the sweep's commit: the tombstone's Delete
        if any(isinstance(op, Delete) and op.key == VOLUME + vol.volume_id for op in ops):
            raise Unavailable("etcd: no quorum")
        return commit(ops)

    monkeypatch.setattr(c.store, "commit", no_quorum_for_deletes)
    c.volumes.delete(vol.volume_id)
    with pytest.raises(Unavailable):  # the sweep fails (its loop logs it and goes on)
        sweeper.flush()
    assert c.state(vol.volume_id) == DELETING and vol.volume_id not in node.held
    monkeypatch.undo()
    c.reconciler.run_once()
    sweeper.flush()
    assert c.state(vol.volume_id) is None
    # the storage was gone: no second node call
    assert [call for call, _ in node.calls].count("delete_volume") == 1


def test_delete_refuses_published_or_staged(three_zones):
    c = three_zones
    vol = c.create("a")
    c.volumes.publish(vol.volume_id, vol.node_id, "mount", False)
    with pytest.raises(InUse, match="published"):
        c.volumes.delete(vol.volume_id)
    c.volumes.unpublish(vol.volume_id, vol.node_id)
    c.nodes[vol.node_id].staged.add(vol.volume_id)
    with pytest.raises(InUse, match="staged"):
        c.volumes.delete(vol.volume_id)
    assert c.state(vol.volume_id) == READY


# --- one answer for an unreachable node ------------------------------------------------
@pytest.mark.parametrize("call", ["expand", "modify"])
def test_unreachable_node_is_unavailable_everywhere(three_zones, call):
    c = three_zones
    vol = c.create("a")
    c.registry.remove(vol.node_id)
    with pytest.raises(Unavailable, match=vol.node_id):
        if call == "expand":
            c.volumes.expand(vol.volume_id, 2 * GIB)
        else:
            c.volumes.modify(vol.volume_id, {"tier": "silver"},
                             lambda p, m: DEFAULT_TIERS[m["tier"]])
    assert c.volumes.record(vol.volume_id)[0] == vol  # nothing changed


def test_publish_to_unknown_node_is_not_found(three_zones):
    c = three_zones
    vol = c.create("a")
    with pytest.raises(NotFound):
        c.volumes.publish(vol.volume_id, "nowhere", "mount", False)
    with pytest.raises(InvalidSpec):
        c.volumes.publish(vol.volume_id, vol.node_id, "block", False)


# --- versions ---------------------------------------------------------------------
def test_node_calls_carry_increasing_record_versions(three_zones):
    c = three_zones
    vol = c.create("a")
    node = c.nodes[vol.node_id]
    c.volumes.expand(vol.volume_id, 2 * GIB)
    v1 = node.held[vol.volume_id].version
    c.volumes.modify(vol.volume_id, {"tier": "bronze"}, lambda p, m: DEFAULT_TIERS["bronze"])
    v2 = node.held[vol.volume_id].version
    assert v2 > v1 > 0
    with pytest.raises(StaleVersion):  # a delayed call from before the tier change
        node.expand_volume(vol.volume_id, 3 * GIB, v1)


# --- two controllers on one store ----------------------------------------------------
def test_two_controllers_racing_on_one_name_make_one_volume(tmp_path):
    nodes = [FakeNode("n1", "z1"), FakeNode("n2", "z2")]
    a = Cluster(str(tmp_path / "s.sqlite"), nodes)
    b = Cluster("", nodes, store=a.store)
    results, errors = [], []

    def run(cluster):
        for _ in range(200):  # the CO retries ABORTED with a backoff
            try:
                results.append(cluster.create("same").volume_id)
                return
            except Busy as e:
                errors.append(e)
                time.sleep(0.005)

    threads = [threading.Thread(target=run, args=(x,)) for x in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(e, Busy) for e in errors), errors
    assert len(set(results)) == 1 and len(results) == 4
    assert sum(len(n.held) for n in nodes) == 1
    a.store.close()


# --- snapshots ----------------------------------------------------------------------
def test_restore_goes_to_the_snapshot_node(three_zones):
    c = three_zones
    vol = c.create("a", constraints=Constraints(requisite=(zone("zone-2"),)))
    snap = c.snapshots.create("s", vol.volume_id, "h")
    restored = c.create("r", source=VolumeSource("snapshot", snap.snapshot_id))
    assert restored.node_id == "n2"
    assert restored.volume_id in c.nodes["n2"].held
    with pytest.raises(AlreadyExists):
        c.snapshots.create("s", vol.volume_id, "other")
    c.snapshots.delete(snap.snapshot_id)
    assert snap.snapshot_id not in c.nodes["n2"].snapshots


def test_topology_segments_use_node_and_zone_keys():
    assert TOPOLOGY_NODE_KEY.endswith("/node")


def test_expansion_the_node_cannot_make_leaves_the_record_as_it_was(three_zones):
    """An NVMe namespace cannot grow: the node answers Precondition, and the record must
    not keep promising a size no retry will reach (ControllerGetVolume would show it)."""
    from engine.errors import Precondition

    c = three_zones
    vol = c.create("fixed", size=GIB)
    node = c.nodes[vol.node_id]

    def refuse(volume_id, size_bytes, version):
        raise Precondition("namespaces cannot grow")

    node.expand_volume = refuse
    with pytest.raises(Precondition):
        c.volumes.expand(vol.volume_id, 2 * GIB)
    record, _ = c.volumes.require_ready(vol.volume_id)
    assert record.capacity_bytes == GIB
    assert c.index.provisioned_bytes(vol.node_id) == GIB
