"""NodeGetInfo: node ID, attach limit, and a topology even when no zone is configured."""

from __future__ import annotations

from csi.config import TOPOLOGY_ZONE_KEY
from csi.server import parse_args
from proto import csi_pb2
from tests import support
from tests.conformance.helpers import ok


def test_node_info(stubs):
    info = ok(stubs.node.NodeGetInfo, csi_pb2.NodeGetInfoRequest())
    assert info.node_id == "node-a"
    assert info.max_volumes_per_node == 8
    assert info.HasField("accessible_topology")
    assert info.accessible_topology.segments[TOPOLOGY_ZONE_KEY] == "zone-a"


def test_node_info_has_a_default_zone_when_none_is_configured(test_root):
    """Started as csi-sanity starts it, with its defaults (no --zone); but a set IOPS capacity,
    not the first start's 45-second measurement (tests/integration/test_capacity.py)."""
    config = parse_args([
        "--endpoint", f"unix://{test_root}/csi.sock", "--state-dir", f"{test_root}/state",
        "--node-id", "node-d", "--pool-size-gib", "8", "--node-iops-capacity", "100000",
    ])
    driver = support.InProcessDriver(config)
    try:
        info = ok(driver.stubs.node.NodeGetInfo, csi_pb2.NodeGetInfoRequest())
        assert info.node_id == "node-d"
        assert info.max_volumes_per_node >= 0
        assert info.HasField("accessible_topology")
        assert info.accessible_topology.segments.get(TOPOLOGY_ZONE_KEY), info
    finally:
        driver.close()
