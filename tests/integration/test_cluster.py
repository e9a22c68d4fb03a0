"""A three-zone cluster on one machine (tests/cluster.py), driven through the CSI API as
the sidecars and the kubelet would: two controllers answering at once, the leading
controller killed in the middle of CreateVolume, each zone cut in turn (the etcd
leader's too), one and then two etcd members killed.

One cluster serves the module; each test leaves it whole (zones healed, processes and
members running) and empty of volumes. Calls that meet a fault are retried as a CO
retries (UNAVAILABLE, ABORTED, DEADLINE_EXCEEDED), within a deadline.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

import grpc
import pytest

from control.records import VOLUME
from control.topology import TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY
from proto import csi_pb2
from tests.cluster import TandemCluster, running, wait_for
from tests.integration.helpers import capability, create_request, publish_request, stage_request

MIB = 1024 * 1024
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
           grpc.StatusCode.DEADLINE_EXCEEDED}


@pytest.fixture(scope="module")
def cluster(request):
    with running(request, "tdm-cluster-") as c:
        yield c


@pytest.fixture
def tidy(cluster):
    """After the test: every zone healed, every process and member running, every volume
    gone (and nothing left in any pool)."""
    yield cluster
    for zone in range(1, cluster.zones + 1):
        cluster.heal(zone)
    for member in cluster.etcd.members:
        if not member.running():
            member.start()
    cluster.etcd.wait_healthy(timeout_s=30)
    for p in [*cluster.nodes, *cluster.controllers]:
        if not p.running():
            p.launch()
    cluster.wait_ready()
    stubs = cluster.controller(0).stubs()
    for entry in retry(lambda: stubs.controller.ListVolumes(csi_pb2.ListVolumesRequest(),
                                                            timeout=10)).entries:
        retry(lambda e=entry: stubs.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=e.volume.volume_id), timeout=30))
    wait_for(lambda: not cluster.store().list(VOLUME), 30, "every record gone",
             lambda: str(cluster.store().list(VOLUME)))
    for node in cluster.nodes:
        assert pool_files(node) == [], f"storage left on {node.node_id}"


def retry(call, timeout_s: float = 60.0):
    """As a CO: repeat while the answer says "try again", until the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except grpc.RpcError as e:
            if e.code() not in RETRIED or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def in_zone(name: str, zone: int, **kw) -> csi_pb2.CreateVolumeRequest:
    req = create_request(name, **kw)
    segments = csi_pb2.Topology(segments={TOPOLOGY_ZONE_KEY: f"zone-{zone}"})
    req.accessibility_requirements.requisite.append(segments)
    return req


def pool_files(node) -> list[str]:
    path = os.path.join(node.pool_dir, "volumes")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def records_by_node(cluster: TandemCluster) -> Counter:
    return Counter(got.value["node_id"] for _, got in cluster.store().list(VOLUME))


def assert_no_orphans(cluster: TandemCluster) -> None:
    """Every pool file has a record and every record at most one file, on every node."""
    by_node = records_by_node(cluster)
    for node in cluster.nodes:
        assert len(pool_files(node)) == by_node.get(node.node_id, 0), (
            f"{node.node_id}: {pool_files(node)} vs {by_node}")


def test_each_node_answers_for_its_own_zone(tidy, test_root):
    cluster = tidy
    for zone in range(1, cluster.zones + 1):
        node = cluster.node(zone)
        info = node.stubs().node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
        assert info.node_id == node.node_id
        assert dict(info.accessible_topology.segments) == {
            TOPOLOGY_NODE_KEY: node.node_id, TOPOLOGY_ZONE_KEY: f"zone-{zone}"}
    # a volume asked for in zone 2 is made there and is that node's to stage
    ctl = cluster.controller(1).stubs()
    vol = ctl.controller.CreateVolume(in_zone("zoned", 2), timeout=30).volume
    assert cluster.node_of(vol) is cluster.node(2)
    assert vol.accessible_topology[0].segments[TOPOLOGY_ZONE_KEY] == "zone-2"
    staging = os.path.join(test_root, "staging")
    os.makedirs(staging)
    with pytest.raises(grpc.RpcError) as e:  # another node does not hold it
        cluster.node(1).stubs().node.NodeStageVolume(stage_request(vol.volume_id, staging),
                                                     timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:  # local volumes are published to their node only
        ctl.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id="node-z1", volume_capability=capability()),
            timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    node = cluster.node(2).stubs()
    node.node.NodeStageVolume(stage_request(vol.volume_id, staging), timeout=60)
    node.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging), timeout=60)


def test_two_controllers_receiving_calls_at_once(tidy):
    """Both controllers get the same CreateVolume calls at the same moment, and other
    calls beside: every name makes exactly one volume, every answer for a name names it,
    and no storage is made twice."""
    cluster = tidy
    stubs = [c.stubs() for c in cluster.controllers]
    names = [f"race-{i}" for i in range(8)]
    answers: dict[str, set[str]] = {n: set() for n in names}
    failures: list[str] = []
    start = threading.Barrier(len(stubs) * 2)

    def worker(s, offset: int) -> None:
        start.wait()
        for i in range(len(names)):
            name = names[(i + offset) % len(names)]
            request = in_zone(name, 1 + names.index(name) % 3)
            try:
                vol = retry(lambda r=request: s.controller.CreateVolume(r, timeout=30).volume)
                answers[name].add(vol.volume_id)
            except grpc.RpcError as e:
                failures.append(f"{name}: {e.code().name}: {e.details()}")

    threads = [threading.Thread(target=worker, args=(s, k * 3))
               for s in stubs for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert all(len(ids) == 1 for ids in answers.values()), answers
    made = {next(iter(ids)) for ids in answers.values()}
    for s in stubs:  # both controllers list the same eight
        listed = retry(lambda s=s: s.controller.ListVolumes(csi_pb2.ListVolumesRequest(),
                                                            timeout=10))
        assert {e.volume.volume_id for e in listed.entries} == made
    assert sum(records_by_node(cluster).values()) == len(names)
    assert_no_orphans(cluster)

    # deletes from both at once: each answers OK, everything goes once
    def delete(s) -> None:
        for vid in sorted(made):
            try:
                retry(lambda v=vid: s.controller.DeleteVolume(
                    csi_pb2.DeleteVolumeRequest(volume_id=v), timeout=30))
            except grpc.RpcError as e:
                failures.append(f"delete {vid}: {e.code().name}: {e.details()}")

    threads = [threading.Thread(target=delete, args=(s,)) for s in stubs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    wait_for(lambda: not cluster.store().list(VOLUME), 30, "tombstones removed")
    assert all(pool_files(n) == [] for n in cluster.nodes)


def test_leader_killed_in_the_middle_of_create_volume(tidy):
    """The leading controller dies between the node's storage and the record's
    confirmation. A retry on the other controller finishes the volume under the same ID;
    a create nobody retries is rolled back by the new leader once its intent expires.
    Either way no storage is left that no record names."""
    cluster = tidy
    a, b = cluster.controllers
    crash = {"TANDEM_CRASH_AT": "create-volume-after-engine"}
    for c in (a, b):
        c.stop()
    a.start(env=crash, args=("--intent-timeout", "6"))
    assert cluster.wait_leader() == a.index
    b.start()
    cluster.wait_ready()

    with pytest.raises(grpc.RpcError) as e:
        a.stubs().controller.CreateVolume(in_zone("finish-me", 1), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert a.wait_exit() < 0  # killed by its crash point
    [(_, record)] = cluster.store().list(VOLUME)
    assert record.value["state"] == "creating" and len(pool_files(cluster.node(1))) == 1
    # the provisioner retries on whichever controller its sidecar reaches now
    vol = retry(lambda: b.stubs().controller.CreateVolume(in_zone("finish-me", 1),
                                                          timeout=30)).volume
    assert vol.volume_id == record.value["volume_id"]
    assert cluster.wait_leader(other_than=a.index) == b.index

    # killed again (a follower this time) on a create that nobody retries: the leader
    # abandons the intent at its deadline and removes what the node made
    a.start(env=crash, args=("--intent-timeout", "6"))
    with pytest.raises(grpc.RpcError):
        a.stubs().controller.CreateVolume(in_zone("roll-me-back", 2), timeout=30)
    assert a.wait_exit() < 0
    assert len(pool_files(cluster.node(2))) == 1
    wait_for(lambda: pool_files(cluster.node(2)) == [] and len(cluster.store().list(VOLUME))
             == 1, 30, "the abandoned create rolled back", lambda: b.log())
    listed = b.stubs().controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=10)
    assert [e.volume.volume_id for e in listed.entries] == [vol.volume_id]
    assert_no_orphans(cluster)
    # the leader's orphan report agrees: nothing on any node without a record
    report_at = time.time()
    wait_for(lambda: cluster.store().get("report/orphans").value["at"] > report_at, 20,
             "a reconcile round on the new leader")
    report = cluster.store().get("report/orphans").value
    assert report["volumes"] == {} and report["snapshots"] == {}
    # the name of the rolled-back create is free again
    again = retry(lambda: b.stubs().controller.CreateVolume(in_zone("roll-me-back", 2),
                                                            timeout=30)).volume
    assert again.volume_id != vol.volume_id
    a.start()


def test_each_zone_cut_in_turn(tidy, test_root):
    """While a zone is cut off (silently), volumes are made, staged and deleted in the
    others; the cut node drops out of the controllers' view (its volumes: not reachable)
    and a delete of one of its volumes answers OK and finishes once the zone is back.
    The zone holding etcd's leader is cut too."""
    cluster = tidy
    ctl = [c.stubs() for c in cluster.controllers]
    zones = list(range(1, cluster.zones + 1))
    remaining, cut_leader = list(zones), False
    while remaining or not cut_leader:
        # etcd's leader moves when a cut member comes back: cut its zone while it leads
        leader_zone = cluster.etcd_leader_zone()
        if not cut_leader and leader_zone is not None and (
                leader_zone in remaining or not remaining):
            zone = leader_zone
        elif remaining:
            zone = remaining[0]
        else:
            time.sleep(0.1)  # no leader right now (an election): ask again
            continue
        if zone in remaining:
            remaining.remove(zone)
        cut_leader |= zone == leader_zone
        stranded = retry(lambda z=zone: ctl[0].controller.CreateVolume(
            in_zone(f"stranded-{z}", z), timeout=30)).volume
        cluster.cut(zone)
        cut_node = cluster.node(zone)
        others = [z for z in zones if z != zone]
        for k, z in enumerate(others):
            s = ctl[k % 2]
            vol = retry(lambda z=z, zone=zone, s=s: s.controller.CreateVolume(
                in_zone(f"during-cut-{zone}-in-{z}", z), timeout=30)).volume
            assert cluster.node_of(vol) is cluster.node(z)
            staging = os.path.join(test_root, f"st-{zone}-{z}")
            os.makedirs(staging)
            node = cluster.node(z).stubs()
            retry(lambda v=vol, p=staging, n=node: n.node.NodeStageVolume(
                stage_request(v.volume_id, p), timeout=60))
            retry(lambda v=vol, p=staging, n=node: n.node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(volume_id=v.volume_id, staging_target_path=p),
                timeout=60))
            retry(lambda v=vol, s=s: s.controller.DeleteVolume(
                csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id), timeout=30))
        # the cut node's registration expires: the controllers say so
        wait_for(lambda n=cut_node: n.node_id not in cluster.registered(), 20,
                 f"{cut_node.node_id} dropped")
        for s in ctl:  # both controllers know, within their re-listing period at worst
            wait_for(lambda v=stranded, s=s: "not reachable" in retry(
                lambda: s.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
                    volume_id=v.volume_id), timeout=10)).status.volume_condition.message,
                15, "the stranded volume reported unreachable")
        retry(lambda v=stranded: ctl[0].controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id), timeout=30))
        assert len(pool_files(cut_node)) == 1  # kept until its node can be told
        cluster.heal(zone)
        wait_for(lambda n=cut_node: n.node_id in cluster.registered(), 30,
                 f"{cut_node.node_id} back")
        wait_for(lambda n=cut_node: pool_files(n) == [], 30,
                 "the tombstone finished by the leader", lambda: cluster.controller(0).log())
    wait_for(lambda: not cluster.store().list(VOLUME), 30, "every record gone")


def test_etcd_members_killed(tidy, test_root):
    """One member down: everything works. Two down: metadata writes fail with
    UNAVAILABLE within the store's timeout and nothing hangs, while the kubelet's calls
    (node-local records) still work. Back up: everything works again."""
    cluster = tidy
    ctl = cluster.controller(0).stubs()
    vol = ctl.controller.CreateVolume(in_zone("survivor", 3), timeout=30).volume
    node = cluster.node(3).stubs()
    staging, target = os.path.join(test_root, "staging"), os.path.join(test_root, "target")
    os.makedirs(staging)

    cluster.etcd.kill(0)
    one_down = retry(lambda: ctl.controller.CreateVolume(in_zone("one-down", 2),
                                                         timeout=30)).volume
    node.node.NodeStageVolume(stage_request(vol.volume_id, staging), timeout=60)
    node.node.NodePublishVolume(publish_request(vol.volume_id, staging, target), timeout=60)
    retry(lambda: ctl.controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(volume_id=one_down.volume_id), timeout=30))

    cluster.etcd.kill(1)
    for method, request in [
        (ctl.controller.CreateVolume, in_zone("no-quorum", 3)),
        (ctl.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id)),
    ]:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            method(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert time.monotonic() - started < 5 + 2 + 2, "the store's timeout bounds the wait"
    # the node's own records: unpublish and unstage need no etcd
    node.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=vol.volume_id, target_path=target), timeout=30)
    node.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging), timeout=30)
    assert not os.path.exists(target)

    cluster.etcd.members[0].start()
    cluster.etcd.members[1].start()
    cluster.etcd.wait_healthy(timeout_s=30)
    retry(lambda: ctl.controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=30))
    back = retry(lambda: ctl.controller.CreateVolume(in_zone("after", 1), timeout=30)).volume
    retry(lambda: ctl.controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(volume_id=back.volume_id), timeout=30))
