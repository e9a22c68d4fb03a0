"""Controller error cases: (request, expected status code) tables.

The sanity suite's "no X provided" specs send fake IDs together with the missing field,
so required fields must be checked before any lookup. Unknown or foreign-looking IDs
are NOT_FOUND (OK on DeleteVolume and ControllerUnpublishVolume), and IDs never
become paths.
"""

from __future__ import annotations

import functools
import os

import pytest

from proto import csi_pb2 as pb
from tests.conformance.helpers import (
    FAKE_NODE_ID,
    FAKE_VOLUME_ID,
    GIB,
    INVALID,
    NOT_FOUND,
    OK,
    UNIMPLEMENTED,
    UNKNOWN_VOLUME_IDS,
    capability,
    expect_code,
    ok,
)


class Ctx:
    """What a request may refer to; the real volume is made only when a case needs it."""

    def __init__(self, co):
        self.co = co
        self.node = co.node_id

    @functools.cached_property
    def vol(self) -> str:
        return self.co.create().volume_id


CAP = capability("mount")
RANGE = pb.CapacityRange(required_bytes=GIB)

CASES = [
    # CreateVolume
    ("create-no-name", "CreateVolume", lambda c: pb.CreateVolumeRequest(
        volume_capabilities=[CAP]), INVALID),
    ("create-nothing", "CreateVolume", lambda c: pb.CreateVolumeRequest(), INVALID),
    ("create-no-capabilities", "CreateVolume", lambda c: pb.CreateVolumeRequest(
        name="no-caps"), INVALID),
    ("create-capability-without-access-type", "CreateVolume", lambda c: pb.CreateVolumeRequest(
        name="no-type", volume_capabilities=[pb.VolumeCapability(
            access_mode=pb.VolumeCapability.AccessMode(mode=1))]), INVALID),
    ("create-unknown-fs-type", "CreateVolume", lambda c: pb.CreateVolumeRequest(
        name="bad-fs", volume_capabilities=[capability("mount", fs_type="nosuchfs")]), INVALID),
    ("create-unknown-parameter", "CreateVolume", lambda c: pb.CreateVolumeRequest(
        name="bad-param", volume_capabilities=[CAP], parameters={"XXX_FakeKey": "x"}), INVALID),
    ("create-unknown-mutable-parameter", "CreateVolume", lambda c: pb.CreateVolumeRequest(
        name="bad-mutable", volume_capabilities=[CAP],
        mutable_parameters={"XXX_FakeKey": "XXX_FakeValue"}), INVALID),
    ("create-clone-of-unknown-volume", "CreateVolume", lambda c: pb.CreateVolumeRequest(
        name="clone", volume_capabilities=[CAP], volume_content_source=pb.VolumeContentSource(
            volume=pb.VolumeContentSource.VolumeSource(volume_id=FAKE_VOLUME_ID))), NOT_FOUND),
    # DeleteVolume
    ("delete-no-id", "DeleteVolume", lambda c: pb.DeleteVolumeRequest(), INVALID),
    # ValidateVolumeCapabilities
    ("validate-no-id", "ValidateVolumeCapabilities", lambda c:
        pb.ValidateVolumeCapabilitiesRequest(volume_capabilities=[CAP]), INVALID),
    ("validate-no-capabilities", "ValidateVolumeCapabilities", lambda c:
        pb.ValidateVolumeCapabilitiesRequest(volume_id=c.vol), INVALID),
    ("validate-fake-id-no-capabilities", "ValidateVolumeCapabilities", lambda c:
        pb.ValidateVolumeCapabilitiesRequest(volume_id=FAKE_VOLUME_ID), INVALID),
    # ControllerPublishVolume
    ("publish-nothing", "ControllerPublishVolume", lambda c:
        pb.ControllerPublishVolumeRequest(), INVALID),
    ("publish-no-node", "ControllerPublishVolume", lambda c: pb.ControllerPublishVolumeRequest(
        volume_id=FAKE_VOLUME_ID), INVALID),
    ("publish-fake-ids-no-capability", "ControllerPublishVolume", lambda c:
        pb.ControllerPublishVolumeRequest(volume_id=FAKE_VOLUME_ID, node_id=FAKE_NODE_ID),
        INVALID),
    ("publish-no-capability", "ControllerPublishVolume", lambda c:
        pb.ControllerPublishVolumeRequest(volume_id=c.vol, node_id=c.node), INVALID),
    ("publish-fake-ids", "ControllerPublishVolume", lambda c: pb.ControllerPublishVolumeRequest(
        volume_id=FAKE_VOLUME_ID, node_id=FAKE_NODE_ID, volume_capability=CAP), NOT_FOUND),
    ("publish-unknown-node", "ControllerPublishVolume", lambda c:
        pb.ControllerPublishVolumeRequest(volume_id=c.vol, node_id=FAKE_NODE_ID,
                                          volume_capability=CAP), NOT_FOUND),
    # ControllerUnpublishVolume
    ("unpublish-no-id", "ControllerUnpublishVolume", lambda c:
        pb.ControllerUnpublishVolumeRequest(), INVALID),
    ("unpublish-never-published", "ControllerUnpublishVolume", lambda c:
        pb.ControllerUnpublishVolumeRequest(volume_id=c.vol, node_id=c.node), OK),
    # ControllerExpandVolume
    ("expand-no-id", "ControllerExpandVolume", lambda c: pb.ControllerExpandVolumeRequest(
        capacity_range=RANGE, volume_capability=CAP), INVALID),
    ("expand-nothing", "ControllerExpandVolume", lambda c:
        pb.ControllerExpandVolumeRequest(), INVALID),
    ("expand-fake-id-no-range", "ControllerExpandVolume", lambda c:
        pb.ControllerExpandVolumeRequest(volume_id=FAKE_VOLUME_ID), INVALID),
    ("expand-no-range", "ControllerExpandVolume", lambda c:
        pb.ControllerExpandVolumeRequest(volume_id=c.vol), INVALID),
    # ControllerGetVolume
    ("get-no-id", "ControllerGetVolume", lambda c: pb.ControllerGetVolumeRequest(), INVALID),
    # ControllerModifyVolume
    ("modify-no-id", "ControllerModifyVolume", lambda c: pb.ControllerModifyVolumeRequest(
        mutable_parameters={"tier": "gold"}), INVALID),
    ("modify-unknown-key", "ControllerModifyVolume", lambda c: pb.ControllerModifyVolumeRequest(
        volume_id=c.vol, mutable_parameters={"XXX_FakeKey": "XXX_FakeValue"}), INVALID),
    # ListVolumes
    ("list-negative-max-entries", "ListVolumes", lambda c:
        pb.ListVolumesRequest(max_entries=-1), INVALID),
]

# The same unknown IDs through every RPC that looks a volume up.
UNKNOWN_ID_CASES = [
    ("DeleteVolume", lambda v, c: pb.DeleteVolumeRequest(volume_id=v), OK),
    ("ControllerUnpublishVolume", lambda v, c: pb.ControllerUnpublishVolumeRequest(
        volume_id=v, node_id=c.node), OK),
    ("ValidateVolumeCapabilities", lambda v, c: pb.ValidateVolumeCapabilitiesRequest(
        volume_id=v, volume_capabilities=[CAP]), NOT_FOUND),
    ("ControllerPublishVolume", lambda v, c: pb.ControllerPublishVolumeRequest(
        volume_id=v, node_id=c.node, volume_capability=CAP), NOT_FOUND),
    ("ControllerExpandVolume", lambda v, c: pb.ControllerExpandVolumeRequest(
        volume_id=v, capacity_range=RANGE), NOT_FOUND),
    ("ControllerGetVolume", lambda v, c: pb.ControllerGetVolumeRequest(volume_id=v), NOT_FOUND),
    ("ControllerModifyVolume", lambda v, c: pb.ControllerModifyVolumeRequest(
        volume_id=v, mutable_parameters={"tier": "gold"}), NOT_FOUND),
]


@pytest.mark.parametrize("case_id, rpc, build, code", CASES, ids=[c[0] for c in CASES])
def test_controller_error(co, case_id, rpc, build, code):
    ctx = Ctx(co)
    request = build(ctx)
    expect_code(getattr(co.stubs.controller, rpc), request, code)


@pytest.mark.parametrize("volume_id", UNKNOWN_VOLUME_IDS)
def test_unknown_volume_ids(co, test_root, volume_id):
    ctx = Ctx(co)
    before = sorted(os.listdir(test_root))
    for rpc, build, code in UNKNOWN_ID_CASES:
        expect_code(getattr(co.stubs.controller, rpc), build(volume_id, ctx), code)
    assert sorted(os.listdir(test_root)) == before  # nothing made from an ID


def test_snapshots_are_answered_as_advertised(stubs):
    """ListSnapshots(snapshot_id=unknown) is OK and empty once LIST_SNAPSHOTS is advertised;
    until then every snapshot RPC is UNIMPLEMENTED (and the sanity suite skips them)."""
    Cap = pb.ControllerServiceCapability.RPC
    caps = {c.rpc.type for c in ok(stubs.controller.ControllerGetCapabilities,
                                     pb.ControllerGetCapabilitiesRequest()).capabilities}
    request = pb.ListSnapshotsRequest(snapshot_id="non-existing-snapshot-id")
    if Cap.LIST_SNAPSHOTS in caps:
        assert not ok(stubs.controller.ListSnapshots, request).entries
    else:
        expect_code(stubs.controller.ListSnapshots, request, UNIMPLEMENTED)
    if Cap.CREATE_DELETE_SNAPSHOT in caps:
        ok(stubs.controller.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id="fake-snap-id"))
    else:
        expect_code(stubs.controller.DeleteSnapshot,
                    pb.DeleteSnapshotRequest(snapshot_id="fake-snap-id"), UNIMPLEMENTED)
