"""Leader-only background work on a real etcd: of two controllers only the elected one
reconciles; when it steps down the other takes over; a deposed leader's reconciler writes
nothing (its commits are fenced), whatever it had read."""

from __future__ import annotations

import time

import pytest

from control.election import Election
from control.etcd_client import EtcdConfig
from control.etcd_store import EtcdStore
from control.leader import ORPHAN_REPORT, LeaderDuties
from control.plane import ControlPlane
from control.records import CREATING, DELETING
from control.registry import NodeRegistry
from control.volumes import VolumePolicy, VolumeRequest
from engine import crash
from tests.fake_nodes import GIB, FakeNode


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def wait_for(predicate, timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def controllers(etcd1):
    """make(name) -> (plane, store): controllers sharing one namespace and two fake nodes."""
    namespace = f"/lead-{time.monotonic_ns()}/"
    nodes = [FakeNode("n1", "z1"), FakeNode("n2", "z2")]
    clock = Clock()
    made: list = []

    def make(name: str):
        store = EtcdStore(EtcdConfig.from_url(etcd1.url, namespace=namespace, timeout_s=5,
                                              attempt_timeout_s=1))
        registry = NodeRegistry(info_ttl_s=0)
        for n in nodes:
            registry.add(n)
        plane = ControlPlane(store, registry, VolumePolicy(intent_timeout_s=30), clock=clock)
        plane.start(0, shared_store=True, reconcile=False)
        made.append((plane, store))
        return plane, store

    make.nodes = nodes
    make.clock = clock
    yield make
    for plane, store in made:
        plane.close()
        store.close()


def intent(plane: ControlPlane, name: str, monkeypatch) -> str:
    """A create that died after its intent: a CREATING record, no storage."""
    monkeypatch.setenv("TANDEM_FAIL_AT", "create-volume-after-intent")
    with pytest.raises(crash.InjectedFault):
        plane.volumes.create(VolumeRequest(name=name, request_hash="h", size_bytes=GIB,
                                           access_types=("mount",)))
    monkeypatch.delenv("TANDEM_FAIL_AT")
    (record,) = [r for r, _ in (plane.volumes.record(k.split("/", 1)[1]) for k, _ in
                                plane.store.list("volume/")) if r.name == name]
    return record.volume_id


def test_only_the_leader_reconciles_and_the_other_takes_over(controllers, monkeypatch):
    (plane_a, store_a), (plane_b, store_b) = controllers("a"), controllers("b")
    a = LeaderDuties(store_a, plane_a, "ctl-a", interval_s=0.2, ttl_s=2)
    b = LeaderDuties(store_b, plane_b, "ctl-b", interval_s=0.2, ttl_s=2)
    a.start()
    wait_for(a.leading.is_set, what="a leads")
    b.start()
    try:
        wait_for(lambda: a.rounds >= 2, what="a reconciles")
        assert not b.leading.is_set() and b.rounds == 0
        report = store_b.get(ORPHAN_REPORT)
        assert report is not None and report.value["volumes"] == {}
        assert Election(store_b, "controller").leader().value == "ctl-a"
        # an intent nobody retries expires: the leader's reconciler rolls it back
        vid = intent(plane_b, "abandoned", monkeypatch)
        controllers.clock.now += 31
        wait_for(lambda: plane_b.volumes.record(vid) is None, what="intent rolled back")
        # the leader steps down: the other takes over at once (no TTL to wait for)
        a.stop()
        wait_for(b.leading.is_set, timeout_s=3, what="b leads")
        rounds = b.rounds
        wait_for(lambda: b.rounds > rounds, what="b reconciles")
        assert Election(store_a, "controller").leader().value == "ctl-b"
    finally:
        a.stop()
        b.stop()


def test_a_deposed_leaders_reconciler_writes_nothing(controllers, monkeypatch):
    (plane_a, store_a), (plane_b, store_b) = controllers("a"), controllers("b")
    election = Election(store_a, "controller")
    lease = store_a.grant_lease(2)
    old = election.campaign("ctl-a", lease)
    stale = plane_a.reconciler_on(old.fenced(store_a))
    vid = intent(plane_a, "expired", monkeypatch)
    controllers.clock.now += 31
    old.resign()  # deposed (as if its lease had run out); it does not know yet
    assert lease.alive()  # only etcd's fence can refuse its commits
    stale.run_once()
    record, _ = plane_b.volumes.record(vid)
    assert record.state == CREATING, "a deposed leader must not abandon anything"
    # the new leader does
    lease_b = store_b.grant_lease(2)
    new = Election(store_b, "controller").campaign("ctl-b", lease_b)
    try:
        # the tombstone's storage goes too; with no storage made, the record just goes
        plane_b.reconciler_on(new.fenced(store_b)).run_once()
        assert plane_b.volumes.record(vid) is None
    finally:
        new.resign()
        lease_b.revoke()
        lease.revoke()


def test_tombstones_wait_for_their_node_on_the_leader(controllers):
    """Delete answers OK while the node is away; the leader finishes it when it is back."""
    (plane, store), _ = controllers("a"), None
    vol = plane.volumes.create(VolumeRequest(name="v", request_hash="h", size_bytes=GIB,
                                             access_types=("mount",)))
    node = next(n for n in controllers.nodes if n.node_id == vol.node_id)
    plane.nodes.remove(node.node_id)
    plane.volumes.delete(vol.volume_id)
    assert plane.volumes.record(vol.volume_id)[0].state == DELETING
    duties = LeaderDuties(store, plane, "ctl-a", interval_s=0.2, ttl_s=2)
    duties.start()
    try:
        wait_for(lambda: duties.rounds >= 1, what="a round")
        assert plane.volumes.record(vol.volume_id)[0].state == DELETING
        plane.nodes.add(node)
        wait_for(lambda: plane.volumes.record(vol.volume_id) is None, what="converged")
        assert vol.volume_id not in node.held
    finally:
        duties.stop()
