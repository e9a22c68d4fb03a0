"""ControllerPublish/Unpublish: idempotency, read-only conflicts, the attach limit, and
thin capacity (the sanity suite keeps attach limit + 1 volumes of 10 GiB alive at once)."""

from __future__ import annotations

import os

import pytest

from proto import csi_pb2
from tests.conformance.helpers import (
    ALREADY_EXISTS,
    GIB,
    RESOURCE_EXHAUSTED,
    capability,
    expect_code,
    ok,
)


def published_nodes(stubs, volume_id: str) -> list[str]:
    rsp = ok(stubs.controller.ControllerGetVolume,
             csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id))
    return list(rsp.status.published_node_ids)


@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_ten_identical_publishes_are_ok(co, access_type, readonly):
    vol = co.create(access_type=access_type)
    co.controller_publish(vol.volume_id, access_type, readonly=readonly, repeat=10)
    assert published_nodes(co.stubs, vol.volume_id) == [co.node_id]


@pytest.mark.parametrize("first", [False, True], ids=["rw-then-ro", "ro-then-rw"])
def test_republish_with_other_readonly_is_already_exists(co, first):
    vol = co.create()
    co.controller_publish(vol.volume_id, readonly=first)
    expect_code(co.stubs.controller.ControllerPublishVolume,
                csi_pb2.ControllerPublishVolumeRequest(
                    volume_id=vol.volume_id, node_id=co.node_id, volume_capability=capability(),
                    readonly=not first), ALREADY_EXISTS)
    co.controller_publish(vol.volume_id, readonly=first)  # the first one is untouched
    assert published_nodes(co.stubs, vol.volume_id) == [co.node_id]


def test_unpublish_is_idempotent(co):
    vol = co.create()
    co.controller_publish(vol.volume_id)
    ok(co.stubs.controller.ControllerUnpublishVolume, csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume_id, node_id=co.node_id), repeat=3)
    assert published_nodes(co.stubs, vol.volume_id) == []


def test_attach_limit_plus_one_is_resource_exhausted(co):
    """As csi-sanity: limit + 1 volumes of 10 GiB, on a pool image of 8 GiB (thin)."""
    info = ok(co.stubs.node.NodeGetInfo, csi_pb2.NodeGetInfoRequest())
    limit = info.max_volumes_per_node
    assert limit == 8  # the test configuration's
    capacity = ok(co.stubs.controller.GetCapacity, csi_pb2.GetCapacityRequest())
    assert capacity.available_capacity >= (limit + 1) * 10 * GIB, "volumes must be thin"

    vols = [co.create(size=10 * GIB, limit=10 * GIB, repeat=1) for _ in range(limit + 1)]
    assert all(v.capacity_bytes == 10 * GIB for v in vols)
    for vol in vols[:limit]:
        co.controller_publish(vol.volume_id)
    extra = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vols[-1].volume_id, node_id=co.node_id, volume_capability=capability())
    expect_code(co.stubs.controller.ControllerPublishVolume, extra, RESOURCE_EXHAUSTED)
    co.controller_publish(vols[0].volume_id)  # repeating one already attached is still OK

    ok(co.stubs.controller.ControllerUnpublishVolume, csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=vols[0].volume_id, node_id=co.node_id))
    co.made[vols[0].volume_id].published_to.clear()
    co.controller_publish(vols[-1].volume_id)  # room again

    # 90 GiB of volumes, yet hardly anything is allocated for them
    allocated = sum(os.lstat(os.path.join(d, f)).st_blocks * 512
                    for d, _, files in os.walk(co.pool_dir) for f in files)
    assert allocated < 1 * GIB
