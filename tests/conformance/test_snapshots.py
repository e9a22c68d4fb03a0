"""The sanity suite's snapshot, clone and group-snapshot expectations (csi-test v5.4)."""

import pytest

from proto import csi_pb2 as pb
from tests.conformance.helpers import (
    ABORTED,
    ALREADY_EXISTS,
    INVALID,
    NOT_FOUND,
    OK,
    expect_code,
    ok,
)

MAX_NAME = "s" * 128


def snap_request(name, volume_id):
    return pb.CreateSnapshotRequest(name=name, source_volume_id=volume_id)


@pytest.mark.parametrize("request_, code", [
    (pb.CreateSnapshotRequest(source_volume_id="fake-vol-id"), INVALID),  # no name
    (pb.CreateSnapshotRequest(name="no-source"), INVALID),
    (pb.CreateSnapshotRequest(name="x", source_volume_id="fake-vol-id"), NOT_FOUND),
    (pb.CreateSnapshotRequest(name="x", source_volume_id="vol-" + "0" * 32), NOT_FOUND),
])
def test_create_snapshot_errors(stubs, request_, code):
    expect_code(stubs.controller.CreateSnapshot, request_, code)


@pytest.mark.parametrize("method, request_, code", [
    ("DeleteSnapshot", pb.DeleteSnapshotRequest(), INVALID),
    ("DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot_id="fake-snap-id"), OK),
    ("DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot_id="../../etc"), OK),
    ("GetSnapshot", pb.GetSnapshotRequest(), INVALID),
    ("GetSnapshot", pb.GetSnapshotRequest(snapshot_id="fake-snap-id"), NOT_FOUND),
    ("ListSnapshots", pb.ListSnapshotsRequest(starting_token="invalid-token"), ABORTED),
    ("ListSnapshots", pb.ListSnapshotsRequest(max_entries=-1), INVALID),
])
def test_snapshot_id_errors(stubs, method, request_, code):
    if code == OK:
        ok(getattr(stubs.controller, method), request_)
    else:
        expect_code(getattr(stubs.controller, method), request_, code)


def test_unknown_ids_list_empty(stubs):
    assert not ok(stubs.controller.ListSnapshots,
                  pb.ListSnapshotsRequest(snapshot_id="non-existing-snapshot-id")).entries
    assert not ok(stubs.controller.ListSnapshots,
                  pb.ListSnapshotsRequest(source_volume_id="non-existing-volume-id")).entries


def test_names_idempotency_and_listing(co):
    a, b = co.create(), co.create()
    snap = ok(co.stubs.controller.CreateSnapshot, snap_request(MAX_NAME, a.volume_id)).snapshot
    expect_code(co.stubs.controller.CreateSnapshot, snap_request(MAX_NAME, b.volume_id),
                ALREADY_EXISTS)
    others = [ok(co.stubs.controller.CreateSnapshot, snap_request(f"n{i}", b.volume_id)).snapshot
              for i in range(3)]
    by_id = ok(co.stubs.controller.ListSnapshots,
               pb.ListSnapshotsRequest(snapshot_id=snap.snapshot_id)).entries
    assert [e.snapshot for e in by_id] == [snap]
    # GET_SNAPSHOT is advertised: GetSnapshot answers what ListSnapshots does
    assert ok(co.stubs.controller.GetSnapshot,
              pb.GetSnapshotRequest(snapshot_id=snap.snapshot_id)).snapshot == snap
    by_source = ok(co.stubs.controller.ListSnapshots,
                   pb.ListSnapshotsRequest(source_volume_id=b.volume_id)).entries
    assert {e.snapshot.snapshot_id for e in by_source} == {s.snapshot_id for s in others}
    # pages of 2 return every snapshot exactly once
    seen, token = [], ""
    while True:
        page = ok(co.stubs.controller.ListSnapshots,
                  pb.ListSnapshotsRequest(max_entries=2, starting_token=token), repeat=1)
        assert len(page.entries) <= 2
        seen += [e.snapshot.snapshot_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert sorted(seen) == sorted([snap.snapshot_id] + [s.snapshot_id for s in others])
    for s in [snap] + others:
        ok(co.stubs.controller.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=s.snapshot_id))


@pytest.mark.parametrize("kind", ["snapshot", "volume"])
def test_create_from_source_and_missing_source(co, kind):
    src = co.create()
    if kind == "snapshot":
        snap = ok(co.stubs.controller.CreateSnapshot, snap_request("src", src.volume_id)).snapshot
        source = pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id))
        missing = pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id="non-existing-snap"))
    else:
        source = pb.VolumeContentSource(
            volume=pb.VolumeContentSource.VolumeSource(volume_id=src.volume_id))
        missing = pb.VolumeContentSource(
            volume=pb.VolumeContentSource.VolumeSource(volume_id="non-existing-volume-id"))
    made = co.create(volume_content_source=source)
    assert made.content_source == source
    expect_code(co.stubs.controller.CreateVolume,
                co.create_request(volume_content_source=missing), NOT_FOUND)
    if kind == "snapshot":
        ok(co.stubs.controller.DeleteSnapshot,
           pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))


@pytest.mark.parametrize("method, request_, code", [
    ("CreateVolumeGroupSnapshot", pb.CreateVolumeGroupSnapshotRequest(
        source_volume_ids=["fake-vol-id"]), INVALID),
    ("CreateVolumeGroupSnapshot", pb.CreateVolumeGroupSnapshotRequest(name="g"), INVALID),
    ("GetVolumeGroupSnapshot", pb.GetVolumeGroupSnapshotRequest(), INVALID),
    ("GetVolumeGroupSnapshot", pb.GetVolumeGroupSnapshotRequest(
        group_snapshot_id="fake-group-id"), NOT_FOUND),
    ("DeleteVolumeGroupSnapshot", pb.DeleteVolumeGroupSnapshotRequest(), INVALID),
    ("DeleteVolumeGroupSnapshot", pb.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id="fake-group-id"), OK),
])
def test_group_snapshot_errors(stubs, method, request_, code):
    if code == OK:
        ok(getattr(stubs.group, method), request_)
    else:
        expect_code(getattr(stubs.group, method), request_, code)


def test_group_capability_and_plugin_service(stubs):
    caps = ok(stubs.group.GroupControllerGetCapabilities,
              pb.GroupControllerGetCapabilitiesRequest()).capabilities
    assert [c.rpc.type for c in caps] == [
        pb.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT]
    services = {c.service.type for c in ok(stubs.identity.GetPluginCapabilities,
                                            pb.GetPluginCapabilitiesRequest()).capabilities
                if c.HasField("service")}
    assert pb.PluginCapability.Service.GROUP_CONTROLLER_SERVICE in services
