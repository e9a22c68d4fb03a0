"""Mirrored volumes in the controller, on in-memory nodes: placement across zones,
capacity, attach = fence (generations on the replicas, out-of-sync records), deletion
with a node away, and the StorageClass parameters."""

from __future__ import annotations

import pytest

from control import mirrored, placement
from control.healing import Healer
from control.mirrored import GENERATION_KEY, REPLICAS_KEY
from control.placement import Constraints
from control.records import DELETING
from control.store_arbiter import StoreArbiter
from control.topology import TOPOLOGY_ZONE_KEY
from control.volume_index import VolumeIndex
from control.volumes import VolumeRequest
from engine.errors import InvalidSpec, OutOfCapacity, Precondition, Unavailable
from engine.qos.tiers import DEFAULT_TIERS
from tests.fake_nodes import GIB, FakeNode
from tests.unit.test_control_volumes import Cluster


def zone(z: str) -> dict[str, str]:
    return {TOPOLOGY_ZONE_KEY: z}


@pytest.fixture
def zones(tmp_path):
    nodes = [FakeNode(f"n{i}", f"z{i}") for i in (1, 2, 3, 4)]
    nodes.append(FakeNode("n1b", "z1"))  # a second node in zone 1
    cluster = Cluster(str(tmp_path / "cluster.sqlite"), nodes)
    yield cluster
    cluster.store.close()


ANYWHERE = Constraints()


def create(c: Cluster, name: str, replicas: int = 3, remote: bool = False,
           constraints: Constraints = ANYWHERE, size: int = GIB, **kw):
    return c.volumes.create(VolumeRequest(
        name=name, request_hash=name, size_bytes=size, access_types=("mount",),
        replicas=replicas, remote_access=remote, constraints=constraints, **kw))


def test_replicas_go_to_distinct_zones_one_in_the_pods(zones):
    c = zones
    vol = create(c, "a", constraints=Constraints(
        requisite=tuple(zone(z) for z in ("z1", "z2", "z3", "z4")),
        preferred=(zone("z3"), zone("z1"))))
    assert [r.zone for r in vol.replicas][0] == "z3"
    assert len({r.zone for r in vol.replicas}) == 3
    assert vol.node_id == vol.replicas[0].node_id and vol.min_in_sync == 2
    for r in vol.replicas:  # each replica is storage on its node
        assert vol.volume_id in c.nodes[r.node_id].held
    assert vol.access_zones == tuple(r.zone for r in vol.replicas)
    # the arbiter's record: generation 0, every (empty) replica in sync
    rec = StoreArbiter(c.store).get(vol.volume_id)
    assert rec.generation == 0 and set(rec.replicas.values()) == {"in_sync"}


def test_not_enough_zones_is_resource_exhausted_and_says_why(zones):
    c = zones
    with pytest.raises(OutOfCapacity, match="5 replicas need 5 zones"):
        create(c, "a", replicas=5)
    c.nodes["n3"].free_bytes = 0
    with pytest.raises(OutOfCapacity, match="z3"):
        create(c, "b", constraints=Constraints(preferred=(zone("z3"),)))
    with pytest.raises(OutOfCapacity, match="zones asked for"):
        create(c, "c", constraints=Constraints(requisite=(zone("z3"),)))


def test_requisite_zones_hold_replicas_first_the_rest_go_elsewhere(zones):
    c = zones
    # requisite names two zones: both hold a replica, the third goes to another zone
    vol = create(c, "a", constraints=Constraints(requisite=(zone("z1"), zone("z2")),
                                                 preferred=(zone("z2"),)))
    got = [r.zone for r in vol.replicas]
    assert got[:2] == ["z2", "z1"] and got[2] in ("z3", "z4")
    # --strict-topology names only the pod's zone: one replica there, the pod can fail
    # over to the others' zones
    strict = create(c, "b", constraints=Constraints(requisite=(zone("z4"),),
                                                    preferred=(zone("z4"),)))
    assert strict.replicas[0].zone == "z4" and len({r.zone for r in strict.replicas}) == 3
    assert set(strict.access_zones) == {r.zone for r in strict.replicas}


def test_capacity_and_minima_are_paid_on_every_replica_node(zones):
    c = zones
    gold = DEFAULT_TIERS["gold"]  # 4,000 of each node's 10,000
    vol = create(c, "a", qos=gold)
    for r in vol.replicas:
        assert c.index.provisioned_bytes(r.node_id) == GIB
        assert vol.volume_id in c.index.guaranteed(r.node_id)


def test_nodes_without_a_replica_service_never_hold_replicas(zones):
    """An NVMe node (or one run without --replica-listen) registers no replica address:
    placement, self-healing and GetCapacity leave it out rather than fail there."""
    c = zones
    c.nodes["n4"].serves_replicas = False
    for i in range(4):
        vol = create(c, f"v{i}", constraints=Constraints(preferred=(zone("z1"),)))
        assert "n4" not in {r.node_id for r in vol.replicas}
    c.nodes["n3"].serves_replicas = False  # two zones left that serve replicas
    with pytest.raises(OutOfCapacity, match="n3 serves no replicas"):
        create(c, "three")
    with pytest.raises(OutOfCapacity, match="zones asked for"):
        create(c, "there", constraints=Constraints(requisite=(zone("z4"),)))
    infos = [n.info() for n in c.nodes.values()]
    assert placement.replica_capacity(infos, c.index, 1.0, {"z1"}, 3) == 0
    assert placement.replica_capacity(infos, c.index, 1.0, {"z1"}, 2) > 0


def test_replica_capacity_of_a_segment():
    nodes = [FakeNode(f"n{i}", f"z{i}", free_bytes=(i + 1) * GIB) for i in (1, 2, 3)]
    infos = [n.info() for n in nodes]
    index = VolumeIndex()
    avail = {n.node_id: placement.available_bytes(n, index, 1.0) for n in infos}
    # 3 replicas seen from z1: min(z1, the 2nd best of z2, z3)
    assert placement.replica_capacity(infos, index, 1.0, {"z1"}, 3) == min(
        avail["n1"], avail["n2"])
    assert placement.replica_capacity(infos, index, 1.0, {"z3"}, 2) == min(
        avail["n3"], avail["n2"])
    assert placement.replica_capacity(infos, index, 1.0, {"z1"}, 4) == 0  # not enough zones


def test_publish_fences_the_replicas_at_a_new_generation(zones):
    c = zones
    vol = create(c, "a")
    first = vol.replicas[0].node_id
    context = c.volumes.publish(vol.volume_id, first, "mount", False)
    assert context[GENERATION_KEY] == "1"
    assert sorted(context[REPLICAS_KEY].split(",")) == sorted(
        f"{r.node_id}@{r.node_id}:7400" for r in vol.replicas)
    for r in vol.replicas:
        assert c.nodes[r.node_id].generations[vol.volume_id] == 1
    # a repeat answers the same context, fences nothing new
    assert c.volumes.publish(vol.volume_id, first, "mount", False) == context
    # another node while attached: refused; after the unpublish: a newer generation
    other = c.nodes[vol.replicas[1].node_id]
    with pytest.raises(Precondition, match="published to"):
        c.volumes.publish(vol.volume_id, other.node_id, "mount", False)
    c.volumes.unpublish(vol.volume_id, first)
    context = c.volumes.publish(vol.volume_id, other.node_id, "mount", False)
    assert context[GENERATION_KEY] == "2"
    assert all(c.nodes[r.node_id].generations[vol.volume_id] == 2 for r in vol.replicas)


def test_an_unreachable_replica_is_recorded_out_of_sync_at_publish(zones):
    c = zones
    vol = create(c, "a")
    away = vol.replicas[2].node_id
    c.nodes[away].down = True
    c.volumes.publish(vol.volume_id, vol.replicas[0].node_id, "mount", False)
    states = StoreArbiter(c.store).get(vol.volume_id).replicas
    assert states[away] == "out_of_sync"
    assert states[vol.replicas[0].node_id] == "in_sync"
    # every replica away: nothing to fence, nothing to serve from
    remote = create(c, "b", replicas=2, remote=True,
                    constraints=Constraints(preferred=(zone("z1"),)))
    for r in remote.replicas:
        c.nodes[r.node_id].down = True
    outsider = next(n for n in ("n2", "n3", "n4")
                    if n not in {r.node_id for r in remote.replicas})
    with pytest.raises(Unavailable, match="no replica"):
        c.volumes.publish(remote.volume_id, outsider, "mount", False)


def test_pods_go_only_to_replica_zones_unless_remote_access(zones):
    c = zones
    vol = create(c, "a", replicas=2, constraints=Constraints(
        requisite=(zone("z1"), zone("z2"))))
    outsider = "n4"  # zone z4 holds no replica
    with pytest.raises(Precondition, match="remoteAccess"):
        c.volumes.publish(vol.volume_id, outsider, "mount", False)
    remote = create(c, "b", replicas=2, remote=True)
    assert "z4" in remote.access_zones
    c.volumes.publish(remote.volume_id, outsider, "mount", False)


def test_delete_with_a_replica_node_away_keeps_the_tombstone(zones):
    c = zones
    vol = create(c, "a")
    away = vol.replicas[1].node_id
    c.registry.remove(away)
    c.volumes.delete(vol.volume_id)
    assert c.state(vol.volume_id) == DELETING
    for r in vol.replicas:
        if r.node_id != away:
            assert vol.volume_id not in c.nodes[r.node_id].held
    c.registry.add(c.nodes[away])
    c.reconciler.run_once()
    assert c.state(vol.volume_id) is None
    assert vol.volume_id not in c.nodes[away].held
    assert c.store.get(f"arbiter/{vol.volume_id}") is None


@pytest.mark.parametrize("params, expected", [
    ({}, (1, 0, False)),
    ({"replicas": "3"}, (3, 0, False)),
    ({"replicas": "2", "minInSync": "2", "remoteAccess": "true"}, (2, 2, True)),
])
def test_storage_class_parameters(params, expected):
    assert mirrored.parse_parameters(params) == expected


@pytest.mark.parametrize("params", [
    {"replicas": "4"}, {"replicas": "two"}, {"replicas": "2", "minInSync": "3"},
    {"replicas": "1", "remoteAccess": "true"}, {"replicas": "2", "remoteAccess": "yes"},
])
def test_bad_storage_class_parameters_are_invalid(params):
    with pytest.raises(InvalidSpec):
        mirrored.parse_parameters(params)


def test_default_min_in_sync():
    assert mirrored.default_min_in_sync(2) == 1
    assert mirrored.default_min_in_sync(3) == 2


def test_a_replica_away_too_long_is_replaced_and_rebuilt(zones):
    c = zones  # n1 and n1b in z1, n2, n3, n4
    healer = c.reconciler.healer = Healer(c.store, c.registry, c.volumes,
                                          replace_after_s=60, clock=c.clock)
    vol = create(c, "a", constraints=Constraints(
        requisite=tuple(zone(z) for z in ("z1", "z2", "z3")), preferred=(zone("z1"),)))
    lost = next(r for r in vol.replicas if r.zone == "z1")
    c.volumes.publish(vol.volume_id, vol.replicas[1].node_id, "mount", False)
    consumer = c.nodes[vol.replicas[1].node_id]
    consumer.frontends[vol.volume_id] = ()  # its frontend runs
    c.registry.remove(lost.node_id)  # the node's agent is gone
    healer.run_once()
    c.clock.now += 30
    healer.run_once()
    assert c.volumes.record(vol.volume_id)[0].replicas == vol.replicas  # not yet
    c.clock.now += 31
    healer.run_once()
    healed, _ = c.volumes.record(vol.volume_id)
    spare = "n1b" if lost.node_id == "n1" else "n1"
    new = next(r for r in healed.replicas if r.zone == "z1")
    assert new.node_id == spare and healed.retired_replicas == (lost.node_id,)
    assert vol.volume_id in c.nodes[spare].held  # made, marked for a full rebuild
    states = StoreArbiter(c.store).get(vol.volume_id).replicas
    assert states[spare] == "out_of_sync" and lost.node_id not in states
    assert f"{spare}@{spare}:7400" in consumer.frontends[vol.volume_id]
    # the lost node comes back: its old replica's storage goes
    c.registry.add(c.nodes[lost.node_id])
    healer.run_once()
    assert vol.volume_id not in c.nodes[lost.node_id].held
    assert c.volumes.record(vol.volume_id)[0].retired_replicas == ()


def test_a_replica_back_in_time_is_not_replaced(zones):
    c = zones
    healer = Healer(c.store, c.registry, c.volumes, replace_after_s=60, clock=c.clock)
    vol = create(c, "a")
    away = vol.replicas[0].node_id
    c.registry.remove(away)
    healer.run_once()
    c.clock.now += 59
    c.registry.add(c.nodes[away])
    healer.run_once()
    c.clock.now += 120
    healer.run_once()
    assert c.volumes.record(vol.volume_id)[0].replicas == vol.replicas


def test_healing_leaves_healthy_volumes_unlocked(zones):
    # A round over volumes with nothing to heal must not take their locks: the CO's own
    # calls on them (ControllerUnpublish, DeleteVolume) would be ABORTED meanwhile.
    c = zones
    healer = Healer(c.store, c.registry, c.volumes, replace_after_s=60, clock=c.clock)
    vol = create(c, "a")
    taken = []
    real_hold = c.volumes.locks.hold

    def spy(*keys, **kw):
        taken.extend(keys)
        return real_hold(*keys, **kw)

    c.volumes.locks.hold = spy
    healer.run_once()
    assert taken == []
    c.registry.remove(vol.replicas[0].node_id)
    healer.run_once()
    assert taken == []  # away, but not for long yet
    c.clock.now += 61
    healer.run_once()
    assert vol.volume_id in taken  # a replacement was due: then it locks
