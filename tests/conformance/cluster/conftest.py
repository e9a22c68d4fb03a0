"""The conformance suite against a cluster (tests/cluster.py): two controllers, a node
per zone, a 3-member etcd, each in its own process and namespace.

The suite's `driver` becomes a ClusterDriver whose stubs talk as the sidecars and the
kubelet would: controller calls go to the controllers' sockets, alternating between the
two on every call (so each repeated call of the suite's idempotency checks reaches the
other controller), node calls to the socket of the node that holds the volume (learnt
from CreateVolume's answer; calls about volumes nobody made go to the test's home node).
Each test has a home zone, in turn z1, z2, z3: the CO asks for its volumes there (as the
provisioner does for a pod scheduled in that zone), and `co.node_id` is that zone's node.
One cluster serves the whole package; the suite's cleanup after each test leaves it empty.
"""

from __future__ import annotations

import itertools
import threading
from types import SimpleNamespace

import grpc
import pytest

from control.topology import TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY
from proto import csi_pb2, csi_pb2_grpc
from tests import support
from tests.cluster import TandemCluster, running
from tests.conformance.conftest import CO
from tests.conformance.helpers import loops_left_under

_homes = itertools.count()


@pytest.fixture(scope="package")
def cluster(request):
    with running(request, "tdm-conf-cluster-") as c:
        yield c


class Alternating:
    """A service's stub spread over several channels: each call goes to the next one.
    CreateVolume answers teach the router where volumes live."""

    def __init__(self, stub_class, channels, service: str, learn=None):
        self._stubs = [stub_class(ch) for ch in channels]
        self._next = itertools.cycle(range(len(self._stubs)))
        self._lock = threading.Lock()
        self._service = service
        self._learn = learn

    def __getattr__(self, name: str):
        def call(request, *args, **kwargs):
            with self._lock:
                stub = self._stubs[next(self._next)]
            rsp = getattr(stub, name)(request, *args, **kwargs)
            if self._learn is not None and name == "CreateVolume":
                self._learn(rsp.volume)
            return rsp

        call._method = f"/csi.v1.{self._service}/{name}".encode()  # helpers.rpc_name
        return call


class NodeRouter:
    """The Node service of whichever node holds the request's volume."""

    def __init__(self, stubs_by_node: dict[str, csi_pb2_grpc.NodeStub], home: str,
                 placed: dict[str, str]):
        self._stubs = stubs_by_node
        self._home = home
        self._placed = placed

    def __getattr__(self, name: str):
        def call(request, *args, **kwargs):
            node_id = self._placed.get(getattr(request, "volume_id", ""), self._home)
            return getattr(self._stubs[node_id], name)(request, *args, **kwargs)

        call._method = f"/csi.v1.Node/{name}".encode()
        return call


class ClusterDriver:
    """What the suite needs of a driver (stubs, config), over a cluster."""

    def __init__(self, cluster: TandemCluster, home_zone: int, root: str):
        self.cluster = cluster
        home = cluster.node(home_zone)
        self.home = home
        self.config = support.test_config(root, node_id=home.node_id, zone=home.zone,
                                          state_dir=home.state_dir, max_volumes_per_node=8)
        self.placed: dict[str, str] = {}  # volume_id -> node_id
        self.channels = [grpc.insecure_channel(c.endpoint) for c in cluster.controllers]
        node_channels = {n.node_id: grpc.insecure_channel(n.endpoint) for n in cluster.nodes}
        self.channels += list(node_channels.values())
        controllers = self.channels[:len(cluster.controllers)]
        self.stubs = SimpleNamespace(
            identity=Alternating(csi_pb2_grpc.IdentityStub, controllers, "Identity"),
            controller=Alternating(csi_pb2_grpc.ControllerStub, controllers, "Controller",
                                   self._learn),
            group=Alternating(csi_pb2_grpc.GroupControllerStub, controllers,
                              "GroupController"),
            metadata=Alternating(csi_pb2_grpc.SnapshotMetadataStub, controllers,
                                 "SnapshotMetadata"),
            node=NodeRouter({k: csi_pb2_grpc.NodeStub(ch) for k, ch in node_channels.items()},
                            home.node_id, self.placed))
        self.driver = SimpleNamespace(cluster_store=cluster.store())

    def _learn(self, volume: csi_pb2.Volume) -> None:
        """A local volume's node (a mirrored volume's topology names zones only: the
        test's home node, in one of them, serves it)."""
        if volume.volume_id and volume.accessible_topology:
            node_id = volume.accessible_topology[0].segments.get(TOPOLOGY_NODE_KEY)
            if node_id:
                self.placed[volume.volume_id] = node_id

    def close(self) -> None:
        for ch in self.channels:
            ch.close()


@pytest.fixture
def driver(cluster, test_root):
    d = ClusterDriver(cluster, next(_homes) % cluster.zones + 1, test_root)
    try:
        yield d
    finally:
        d.close()


class ClusterCO(CO):
    """The suite's CO, asking for its volumes in the test's home zone."""

    def create_request(self, *args, **kwargs) -> csi_pb2.CreateVolumeRequest:
        req = super().create_request(*args, **kwargs)
        if not req.HasField("accessibility_requirements"):
            zone = csi_pb2.Topology(segments={TOPOLOGY_ZONE_KEY: self.driver.home.zone})
            req.accessibility_requirements.requisite.append(zone)
            req.accessibility_requirements.preferred.append(zone)
        return req

    def cleanup(self) -> list[str]:
        errors = super().cleanup()
        for node in self.driver.cluster.nodes:  # every pool, not only the home node's
            if node is not self.driver.home:
                errors += [f"loop device left on {node.node_id}: {d.path}"
                           for d in loops_left_under(node.pool_dir)]
        return errors


@pytest.fixture
def co(driver, test_root):
    orchestrator = ClusterCO(driver, test_root)
    yield orchestrator
    errors = orchestrator.cleanup()
    assert not errors, "the sanity-style cleanup after the test failed:\n" + "\n".join(errors)
