"""NodeGetVolumeStats: filesystem usage in mount mode, the device's size in block mode;
the volume is checked first, then the path ('some/path' is NOT_FOUND)."""

from __future__ import annotations

import pytest

from proto import csi_pb2
from tests.conformance.helpers import MIB, NOT_FOUND, SMALL, expect_code, ok

Unit = csi_pb2.VolumeUsage


def stats(co, volume_id: str, path: str) -> dict[int, csi_pb2.VolumeUsage]:
    rsp = ok(co.stubs.node.NodeGetVolumeStats,
             csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path))
    assert not rsp.volume_condition.abnormal, rsp.volume_condition.message
    return {u.unit: u for u in rsp.usage}


@pytest.fixture
def published(co, access_type):
    vol = co.create(access_type=access_type)
    staging = co.stage(vol.volume_id, access_type)
    target = co.publish(vol.volume_id, access_type, staging)
    return vol.volume_id, staging, target


def test_stats_of_a_published_volume(co, access_type, published):
    volume_id, staging, target = published
    usage = stats(co, volume_id, target)
    b = usage[Unit.BYTES]
    if access_type == "block":
        # from the device, not statvfs (which would describe devtmpfs)
        assert b.total == SMALL
    else:
        assert SMALL - 16 * MIB < b.total <= SMALL  # ext4 keeps some for itself
        assert 0 < b.available <= b.total and 0 <= b.used <= b.total
        inodes = usage[Unit.INODES]
        assert inodes.total > 0 and 0 < inodes.available <= inodes.total
        assert stats(co, volume_id, staging)[Unit.BYTES].total == b.total


def test_stats_of_an_unknown_path_is_not_found(co, published):
    volume_id, _, target = published
    for path in ("some/path", target + "-not", "/"):
        expect_code(co.stubs.node.NodeGetVolumeStats,
                    csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path),
                    NOT_FOUND)


def test_stats_after_unpublish_is_not_found(co, published):
    volume_id, _, target = published
    co.unpublish(volume_id, target)
    expect_code(co.stubs.node.NodeGetVolumeStats,
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=target),
                NOT_FOUND)
