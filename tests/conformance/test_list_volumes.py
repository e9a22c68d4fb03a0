"""ListVolumes: tokens fail closed, the count moves by exactly one, pages cover all."""

from __future__ import annotations

import grpc
import pytest

from proto import csi_pb2
from tests import support
from tests.conformance.helpers import (
    ABORTED,
    GIB,
    INVALID,
    RESOURCE_EXHAUSTED,
    SMALL,
    capability,
    expect_code,
    ok,
)


def listed(stubs, **kw) -> list[str]:
    rsp = ok(stubs.controller.ListVolumes, csi_pb2.ListVolumesRequest(**kw))
    return [e.volume.volume_id for e in rsp.entries]


@pytest.mark.parametrize("token", ["invalid-token", "v1.", "v1.invalid-token", "v2.vol-" + "0" * 32,
                                   "v1.../../../etc/passwd", "\u00e9t\u00e9"])
def test_invalid_starting_token_is_aborted(co, token):
    co.create()
    expect_code(co.stubs.controller.ListVolumes,
                csi_pb2.ListVolumesRequest(starting_token=token), ABORTED)


@pytest.mark.parametrize("max_entries", [-1, -(2**31)])
def test_negative_max_entries_is_invalid(co, max_entries):
    expect_code(co.stubs.controller.ListVolumes,
                csi_pb2.ListVolumesRequest(max_entries=max_entries), INVALID)


def test_count_moves_by_exactly_one(co):
    before = listed(co.stubs)
    vol = co.create(repeat=3)  # repeats of the same create add nothing
    after_create = listed(co.stubs)
    assert len(after_create) == len(before) + 1 and vol.volume_id in after_create
    # a create that fails leaves no half-made entry behind
    expect_code(co.stubs.controller.CreateVolume,
                co.create_request(size=1024 * GIB, limit=1024 * GIB), RESOURCE_EXHAUSTED)
    assert listed(co.stubs) == after_create
    ok(co.stubs.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert listed(co.stubs) == before


def test_pages_cover_every_volume_once(co):
    made = {co.create(repeat=1).volume_id for _ in range(5)}
    seen, token, pages = [], "", 0
    while True:
        rsp = ok(co.stubs.controller.ListVolumes,
                 csi_pb2.ListVolumesRequest(max_entries=2, starting_token=token))
        assert len(rsp.entries) <= 2
        seen += [e.volume.volume_id for e in rsp.entries]
        pages += 1
        token = rsp.next_token
        if not token:
            break
    assert pages == 3
    assert sorted(seen) == sorted(made)  # each exactly once


def test_token_still_works_when_its_last_volume_is_deleted(co):
    made = [co.create(repeat=1).volume_id for _ in range(4)]
    first = ok(co.stubs.controller.ListVolumes, csi_pb2.ListVolumesRequest(max_entries=2))
    for e in first.entries:
        ok(co.stubs.controller.DeleteVolume,
           csi_pb2.DeleteVolumeRequest(volume_id=e.volume.volume_id))
    rest = listed(co.stubs, starting_token=first.next_token)
    gone = {e.volume.volume_id for e in first.entries}
    assert len(rest) == len(set(rest)) and set(rest) <= set(made) - gone


def test_entries_report_capacity_and_published_nodes(co):
    vol = co.create()
    co.controller_publish(vol.volume_id)
    (entry,) = ok(co.stubs.controller.ListVolumes, csi_pb2.ListVolumesRequest()).entries
    assert entry.volume.volume_id == vol.volume_id
    assert entry.volume.capacity_bytes == SMALL
    assert list(entry.status.published_node_ids) == [co.node_id]


def test_no_half_made_entry_after_a_crash_mid_create(test_root):
    """Killed between the backing file and the record: after restart nothing is listed."""
    proc = support.DriverProcess(test_root)
    channels = []

    def connect():
        stubs = proc.stubs()
        channels.append(stubs.channel)
        return stubs

    try:
        proc.start()
        stubs = connect()
        request = csi_pb2.CreateVolumeRequest(
            name="crashed", capacity_range=csi_pb2.CapacityRange(required_bytes=SMALL),
            volume_capabilities=[capability()])
        before = listed(stubs)
        proc.stop()
        proc.start(env={"TANDEM_CRASH_AT": "create-volume-after-engine"})
        stubs = connect()
        try:
            stubs.controller.CreateVolume(request, timeout=30)
            raise AssertionError("the driver should have died mid-create")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        proc.wait_exit()
        proc.start()
        stubs = connect()
        assert listed(stubs) == before
        vol = ok(stubs.controller.CreateVolume, request).volume  # the name is free again
        assert listed(stubs) == before + [vol.volume_id]
        ok(stubs.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    finally:
        for channel in channels:
            channel.close()
        proc.stop()
