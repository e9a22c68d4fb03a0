"""Advertised capabilities, and the access modes they promise.

csi-sanity skips a spec whose capability is not advertised, so a missing capability
silently shrinks the suite: we check that the ones our behaviour relies on are there.
"""

import pytest

from proto import csi_pb2
from tests.conformance.helpers import INVALID, SNW, Mode, capability, expect_code, ok

Ctl = csi_pb2.ControllerServiceCapability.RPC
Node = csi_pb2.NodeServiceCapability.RPC

# csi-sanity's lists of capabilities it knows (csi-test master, the coming v5.5: GET_SNAPSHOT
# is new there); UNKNOWN is not among them for the controller.
SANITY_CONTROLLER = {
    Ctl.CREATE_DELETE_VOLUME, Ctl.PUBLISH_UNPUBLISH_VOLUME, Ctl.LIST_VOLUMES, Ctl.GET_CAPACITY,
    Ctl.CREATE_DELETE_SNAPSHOT, Ctl.LIST_SNAPSHOTS, Ctl.PUBLISH_READONLY, Ctl.CLONE_VOLUME,
    Ctl.EXPAND_VOLUME, Ctl.MODIFY_VOLUME, Ctl.LIST_VOLUMES_PUBLISHED_NODES, Ctl.GET_VOLUME,
    Ctl.VOLUME_CONDITION, Ctl.SINGLE_NODE_MULTI_WRITER, Ctl.GET_SNAPSHOT,
}
SANITY_NODE = {
    Node.STAGE_UNSTAGE_VOLUME, Node.GET_VOLUME_STATS, Node.EXPAND_VOLUME, Node.VOLUME_CONDITION,
    Node.SINGLE_NODE_MULTI_WRITER, Node.VOLUME_MOUNT_GROUP,
}
NEEDED_CONTROLLER = {
    Ctl.CREATE_DELETE_VOLUME, Ctl.PUBLISH_UNPUBLISH_VOLUME, Ctl.LIST_VOLUMES, Ctl.GET_CAPACITY,
    Ctl.PUBLISH_READONLY, Ctl.EXPAND_VOLUME, Ctl.MODIFY_VOLUME, Ctl.SINGLE_NODE_MULTI_WRITER,
    Ctl.GET_SNAPSHOT,  # GetSnapshot is served (test_snapshots.py), so it is advertised
}
NEEDED_NODE = {
    Node.STAGE_UNSTAGE_VOLUME, Node.GET_VOLUME_STATS, Node.EXPAND_VOLUME,
    Node.SINGLE_NODE_MULTI_WRITER,
}


def controller_caps(stubs) -> list[int]:
    rsp = ok(stubs.controller.ControllerGetCapabilities,
             csi_pb2.ControllerGetCapabilitiesRequest())
    return [c.rpc.type for c in rsp.capabilities]


def node_caps(stubs) -> list[int]:
    rsp = ok(stubs.node.NodeGetCapabilities, csi_pb2.NodeGetCapabilitiesRequest())
    return [c.rpc.type for c in rsp.capabilities]


def test_controller_capabilities(stubs):
    caps = controller_caps(stubs)
    assert Ctl.UNKNOWN not in caps
    assert set(caps) <= SANITY_CONTROLLER, [Ctl.Type.Name(c) for c in caps]
    missing = NEEDED_CONTROLLER - set(caps)
    assert not missing, [Ctl.Type.Name(c) for c in missing]


def test_node_capabilities(stubs):
    caps = node_caps(stubs)
    assert Node.UNKNOWN not in caps
    assert set(caps) <= SANITY_NODE, [Node.Type.Name(c) for c in caps]
    missing = NEEDED_NODE - set(caps)
    assert not missing, [Node.Type.Name(c) for c in missing]


SINGLE_NODE_MODES = [Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
                     Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER]


@pytest.mark.parametrize("kind", ["mount", "block"])
@pytest.mark.parametrize("mode", SINGLE_NODE_MODES, ids=Mode.Mode.Name)
def test_single_node_modes_are_supported(co, kind, mode):
    """SINGLE_NODE_MULTI_WRITER is advertised: its modes must work on create, validate, publish."""
    vol = co.create(access_type=kind, mode=mode)
    rsp = ok(co.stubs.controller.ValidateVolumeCapabilities,
             csi_pb2.ValidateVolumeCapabilitiesRequest(
                 volume_id=vol.volume_id, volume_capabilities=[capability(kind, mode)]))
    assert rsp.HasField("confirmed"), rsp.message
    assert list(rsp.confirmed.volume_capabilities) == [capability(kind, mode)]
    co.controller_publish(vol.volume_id, kind, mode=mode,
                          readonly=mode == Mode.SINGLE_NODE_READER_ONLY)


@pytest.mark.parametrize("mode", [Mode.MULTI_NODE_MULTI_WRITER, Mode.MULTI_NODE_READER_ONLY,
                                  Mode.MULTI_NODE_SINGLE_WRITER], ids=Mode.Mode.Name)
def test_multi_node_modes_are_not_confirmed(co, mode):
    vol = co.create()
    rsp = ok(co.stubs.controller.ValidateVolumeCapabilities,
             csi_pb2.ValidateVolumeCapabilitiesRequest(
                 volume_id=vol.volume_id, volume_capabilities=[capability("mount", mode)]))
    assert not rsp.HasField("confirmed") and rsp.message
    expect_code(co.stubs.controller.CreateVolume,
                co.create_request(mode=mode), INVALID)


def test_unknown_access_mode_is_invalid(co):
    expect_code(co.stubs.controller.CreateVolume, co.create_request(mode=Mode.UNKNOWN), INVALID)


def test_validate_capabilities_of_the_wrong_access_type_is_not_confirmed(co):
    vol = co.create(access_type="mount")
    rsp = ok(co.stubs.controller.ValidateVolumeCapabilities,
             csi_pb2.ValidateVolumeCapabilitiesRequest(
                 volume_id=vol.volume_id, volume_capabilities=[capability("block", SNW)]))
    assert not rsp.HasField("confirmed")

