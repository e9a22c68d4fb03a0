"""CreateVolume: sizes, names, idempotency, mutable parameters, clones."""

from __future__ import annotations

import grpc
import pytest

from proto import csi_pb2
from tests.conformance.helpers import (
    ALREADY_EXISTS,
    GIB,
    INVALID,
    MIB,
    OUT_OF_RANGE,
    RESOURCE_EXHAUSTED,
    SMALL,
    XFS_SMALL,
    expect_code,
    ok,
)

# (required_bytes, limit_bytes, fs_type, expected capacity or status code)
SIZES = [
    pytest.param(SMALL, 0, "ext4", SMALL, id="required"),
    pytest.param(SMALL, SMALL, "ext4", SMALL, id="required=limit"),
    # csi-sanity: required = limit = 10 GiB must give exactly 10 GiB (sparse, so cheap)
    pytest.param(10 * GIB, 10 * GIB, "ext4", 10 * GIB, id="10GiB-exact"),
    pytest.param(SMALL + 1, 0, "ext4", ">=", id="unaligned-rounds-up"),
    pytest.param(SMALL + 1, SMALL + 1, "ext4", OUT_OF_RANGE, id="rounding-past-limit"),
    pytest.param(0, 10 * GIB, "ext4", "<=", id="limit-only"),
    pytest.param(0, 0, "ext4", ">0", id="no-range"),
    pytest.param(0, 1 * MIB, "ext4", OUT_OF_RANGE, id="limit-below-minimum"),
    pytest.param(SMALL, 0, "xfs", XFS_SMALL, id="xfs-minimum"),
    pytest.param(SMALL, SMALL, "xfs", OUT_OF_RANGE, id="xfs-limit-below-minimum"),
]


@pytest.mark.parametrize("required, limit, fs_type, expected", SIZES)
def test_create_volume_sizes(co, required, limit, fs_type, expected):
    if isinstance(expected, grpc.StatusCode):
        expect_code(co.stubs.controller.CreateVolume,
                    co.create_request(size=required, limit=limit, fs_type=fs_type), expected)
        return
    vol = co.create(size=required, limit=limit, fs_type=fs_type)  # made twice: same answer
    got = vol.capacity_bytes
    if expected == ">=":
        assert got >= required
    elif expected == "<=":
        assert 0 < got <= limit
    elif expected == ">0":
        assert got > 0
    elif fs_type == "xfs":
        assert got >= expected
    else:
        assert got == expected
    if required % GIB == 0 and required:
        assert got % GIB == 0, "rounding must keep whole GiB sizes exact"
    get = ok(co.stubs.controller.ControllerGetVolume,
             csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert get.volume.capacity_bytes == got


def test_same_name_same_request_returns_the_same_volume(co):
    first = co.create(name="twice", repeat=10)
    assert first.capacity_bytes >= SMALL


@pytest.mark.parametrize("other_size", [2 * SMALL, 1024 * GIB], ids=["bigger", "beyond-pool"])
def test_same_name_other_size_is_already_exists(co, other_size):
    """Checked before capacity: even a size the pool could never hold is ALREADY_EXISTS."""
    co.create(name="sized", size=SMALL, limit=SMALL)
    if other_size > 100 * GIB:  # the precondition: alone, this size does not fit
        expect_code(co.stubs.controller.CreateVolume,
                    co.create_request(name="elsewhere", size=other_size, limit=other_size),
                    RESOURCE_EXHAUSTED)
    expect_code(co.stubs.controller.CreateVolume,
                co.create_request(name="sized", size=other_size, limit=other_size),
                ALREADY_EXISTS)


def test_same_name_other_access_type_is_already_exists(co):
    co.create(name="typed", access_type="mount")
    expect_code(co.stubs.controller.CreateVolume,
                co.create_request(name="typed", access_type="block"), ALREADY_EXISTS)


def test_maximum_length_name(co):
    name = ("sanity-controller-create-maxlen-" + "x" * 128)[:128]
    first = co.create(name=name)
    assert co.create(name=name).volume_id == first.volume_id


@pytest.mark.parametrize("mutable", [{"tier": "gold"}, {}], ids=["tier-gold", "none"])
def test_mutable_parameters_accepted(co, mutable):
    co.create(mutable_parameters=mutable)


def test_unknown_mutable_key_makes_nothing(co):
    def count():
        return len(ok(co.stubs.controller.ListVolumes, csi_pb2.ListVolumesRequest(),
                      repeat=1).entries)

    before = count()
    expect_code(co.stubs.controller.CreateVolume,
                co.create_request(name="vac", mutable_parameters={"XXX_FakeKey": "XXX_FakeValue"}),
                INVALID)
    assert count() == before
    co.create(name="vac", mutable_parameters={"tier": "gold"})  # the name was not taken
    assert count() == before + 1


def test_clone_of_an_existing_volume(co):
    source = co.create()
    clone = co.create(volume_content_source=csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=source.volume_id)))
    assert clone.volume_id != source.volume_id
    assert clone.content_source.volume.volume_id == source.volume_id
