"""Node registrations on a real etcd: a node process registers under a lease and keeps its
figures fresh; the controller's registry follows the registrations (no call to a node to
place a volume); a node whose lease ends disappears, and comes back when it registers
again."""

from __future__ import annotations

import time

import pytest

from control.etcd_client import EtcdConfig
from control.etcd_store import EtcdStore
from control.node_watch import NodeWatch
from control.registration import NODE, Registrar, Registration
from control.registry import NodeRegistry
from engine.errors import Unavailable
from proto.etcd import rpc_pb2
from tests.fake_nodes import GIB, FakeNode


def wait_for(predicate, timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        time.sleep(0.02)


@pytest.fixture
def stores(etcd1):
    namespace = f"/reg-{time.monotonic_ns()}/"
    made = []

    def open_() -> EtcdStore:
        store = EtcdStore(EtcdConfig.from_url(etcd1.url, namespace=namespace, timeout_s=5,
                                              attempt_timeout_s=1))
        made.append(store)
        return store

    yield open_
    for s in made:
        s.close()


class Clients:
    """The controller's `connect`: a client per registration (here the FakeNode the
    address names), remembering what it made."""

    def __init__(self, nodes: dict[str, FakeNode]):
        self.nodes = nodes
        self.made: list[tuple[str, str]] = []

    def __call__(self, reg: Registration) -> FakeNode:
        self.made.append((reg.node_id, reg.agent_address))
        return self.nodes[reg.agent_address]


def test_registered_nodes_are_placed_from_their_figures(stores):
    node_store, controller_store = stores(), stores()
    node = FakeNode("n1", "zone-b", free_bytes=70 * GIB, iops_capacity=4321, max_volumes=17)
    registrar = Registrar(node_store, node, "198.18.0.11:7600", "1.2.3", ttl_s=2,
                          refresh_s=0.3)
    record = registrar.start()
    assert record.zone == "zone-b" and record.agent_address == "198.18.0.11:7600"
    registry = NodeRegistry()
    clients = Clients({"198.18.0.11:7600": node})
    watch = NodeWatch(controller_store, registry, clients)
    try:
        watch.start()
        assert registry.ids() == ["n1"]  # listed before start() returns
        node.calls.clear()
        info = registry.info("n1")
        assert (info.zone, info.free_bytes, info.iops_capacity, info.max_volumes) == (
            "zone-b", 70 * GIB, 4321, 17)
        assert registry.infos() == [info]
        assert node.calls == [], "placement must not call the node"
        # the node's figures change: the registry follows the refreshed registration
        node.free_bytes = 10 * GIB
        wait_for(lambda: registry.info("n1").free_bytes == 10 * GIB, what="refresh")
        assert clients.made == [("n1", "198.18.0.11:7600")], "same agent: same client"
        assert registry.info("n1", fresh=True).free_bytes == 10 * GIB  # asks the node
        # a clean stop withdraws the registration at once
        registrar.stop()
        wait_for(lambda: not registry.known("n1"), timeout_s=3, what="deregistration")
        with pytest.raises(Unavailable, match="n1 is not reachable"):
            registry.require("n1")
    finally:
        watch.close()
        registrar.stop()


def test_a_node_whose_lease_expires_disappears_and_comes_back(stores):
    node_store, controller_store = stores(), stores()
    node = FakeNode("n2", "z1")
    registrar = Registrar(node_store, node, "198.18.0.12:7600", "1", ttl_s=2, refresh_s=0.3)
    registrar.start()
    registry = NodeRegistry()
    watch = NodeWatch(controller_store, registry, Clients({"198.18.0.12:7600": node,
                                                          "198.18.0.22:7600": node}))
    watch.start()
    try:
        assert registry.known("n2")
        # the node hangs (no renewals, no refreshes): its key expires with the lease
        registrar._stop.set()
        registrar._thread.join()
        registrar.lease.stop_keep_alive()
        started = time.monotonic()
        wait_for(lambda: not registry.known("n2"), timeout_s=10, what="expiry")
        assert time.monotonic() - started < 6
        assert controller_store.get(NODE + "n2") is None
        # back, on another address: registered again, with a client for the new address
        registrar2 = Registrar(node_store, node, "198.18.0.22:7600", "1", ttl_s=2,
                               refresh_s=0.3)
        registrar2.start()
        wait_for(lambda: registry.known("n2"), what="re-registration")
        assert watch.addresses["n2"] == "198.18.0.22:7600"
        registrar2.stop()
    finally:
        watch.close()


def test_the_registrar_registers_again_after_losing_its_lease(stores):
    """The lease ran out while etcd was unreachable: the next refresh takes a new lease
    and the record is back without anyone restarting the node."""
    node_store, controller_store = stores(), stores()
    node = FakeNode("n3", "z3")
    registrar = Registrar(node_store, node, "198.18.0.13:7600", "1", ttl_s=2, refresh_s=0.3)
    registrar.start()
    try:
        first = registrar.lease
        # as etcd would after a partition longer than the TTL
        node_store.client.call("Lease", "LeaseRevoke",
                               rpc_pb2.LeaseRevokeRequest(ID=first.id), idempotent=True)
        wait_for(lambda: registrar.lease is not first and registrar.registered.is_set()
                 and controller_store.get(NODE + "n3") is not None, what="new lease")
    finally:
        registrar.stop()


def test_registration_records_read_back_and_tolerate_newer_fields():
    reg = Registration("n", "z", "a:1", 10, 5, 1, 100, 8, software_version="v")
    value = reg.to_value()
    assert Registration.from_value(value) == reg
    assert Registration.from_value({**value, "added_later": 1}) == reg
    assert reg.info().node_id == "n" and reg.key == "node/n"
