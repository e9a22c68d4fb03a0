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
    SNW,
    XFS_SMALL,
    Mode,
    capability,
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


# --- same name again: a retry (OK, the same volume) or another request (ALREADY_EXISTS) ---

BRONZE = {"tier": "bronze"}
HERE = {"topology.tandem.csi.dev/node": "node-a", "topology.tandem.csi.dev/zone": "zone-a"}
ELSEWHERE = {"topology.tandem.csi.dev/zone": "zone-b"}


def topology(*segments: dict[str, str], preferred=()) -> csi_pb2.TopologyRequirement:
    return csi_pb2.TopologyRequirement(
        requisite=[csi_pb2.Topology(segments=s) for s in segments],
        preferred=[csi_pb2.Topology(segments=s) for s in preferred])


# What the second CreateVolume asks, beside the first one's: name "again", 64 MiB,
# parameters tier=bronze, no mutable parameters, mount SINGLE_NODE_WRITER (ext4), no source.
INCOMPATIBLE = [
    pytest.param(dict(parameters={"tier": "silver"}), id="other-tier"),
    pytest.param(dict(parameters={**BRONZE, "maxReadIops": "100"}), id="extra-parameter"),
    pytest.param(dict(parameters={}), id="no-parameters"),
    pytest.param(dict(parameters=BRONZE, mutable_parameters={"tier": "gold"}),
                 id="other-mutable-parameters"),
    pytest.param(dict(parameters=BRONZE, mode=Mode.SINGLE_NODE_MULTI_WRITER),
                 id="other-access-mode"),
    pytest.param(dict(parameters=BRONZE, fs_type="xfs"), id="other-fs-type"),
    pytest.param(dict(parameters=BRONZE, size=2 * SMALL), id="bigger"),
    pytest.param(dict(parameters=BRONZE, size=SMALL // 2, limit=SMALL // 2), id="smaller"),
    pytest.param(dict(parameters=BRONZE, accessibility_requirements=topology(ELSEWHERE)),
                 id="outside-requisite-topology"),
]

COMPATIBLE = [
    pytest.param(dict(parameters=BRONZE), id="identical"),
    pytest.param(dict(parameters={**BRONZE, "csi.storage.k8s.io/pvc/name": "other",
                                  "csi.storage.k8s.io/pvc/namespace": "ns"}),
                 id="other-sidecar-keys"),
    pytest.param(dict(parameters=BRONZE, fs_type="ext4"), id="default-fs-type-spelt-out"),
    pytest.param(dict(parameters=BRONZE, size=SMALL // 2), id="smaller-required-no-limit"),
    pytest.param(dict(parameters=BRONZE, size=0, limit=SMALL), id="limit-only"),
    pytest.param(dict(parameters=BRONZE, accessibility_requirements=topology(
        HERE, ELSEWHERE, preferred=[ELSEWHERE])), id="requisite-holds-it-preferred-not"),
]


def _create_first(co) -> csi_pb2.Volume:
    return co.create(name="again", size=SMALL, parameters=BRONZE)


@pytest.mark.parametrize("second", INCOMPATIBLE)
def test_same_name_other_request_is_already_exists(co, second):
    """The spec's ALREADY_EXISTS: the old code answered OK with the old volume for most of
    these (it compared only sizes, access types and the content source)."""
    _create_first(co)
    expect_code(co.stubs.controller.CreateVolume, co.create_request(name="again", **second),
                ALREADY_EXISTS)


@pytest.mark.parametrize("second", COMPATIBLE)
def test_same_name_compatible_request_is_the_same_volume(co, second):
    first = _create_first(co)
    again = ok(co.stubs.controller.CreateVolume, co.create_request(name="again", **second))
    assert again.volume == first


def test_capabilities_within_those_made_with_are_compatible(co):
    both = [capability("mount", SNW), capability("mount", Mode.SINGLE_NODE_READER_ONLY)]

    def request(caps):
        req = co.create_request(name="caps")
        del req.volume_capabilities[:]
        req.volume_capabilities.extend(caps)
        return req

    first = ok(co.stubs.controller.CreateVolume, request(both)).volume
    co._made(first.volume_id)
    for one in both:
        assert ok(co.stubs.controller.CreateVolume, request([one])).volume == first
    expect_code(co.stubs.controller.CreateVolume,
                request([capability("mount", Mode.SINGLE_NODE_MULTI_WRITER)]), ALREADY_EXISTS)
    expect_code(co.stubs.controller.CreateVolume, request([capability("block", SNW)]),
                ALREADY_EXISTS)


def test_retry_of_the_original_create_still_matches_after_a_tier_change(co):
    """Compared with what was asked at creation, not with the volume's state now."""
    first = co.create(name="tiered", parameters=BRONZE, mutable_parameters={"tier": "silver"})
    ok(co.stubs.controller.ControllerModifyVolume, csi_pb2.ControllerModifyVolumeRequest(
        volume_id=first.volume_id, mutable_parameters={"tier": "gold"}))
    original = co.create_request(name="tiered", parameters=BRONZE,
                                 mutable_parameters={"tier": "silver"})
    assert ok(co.stubs.controller.CreateVolume, original).volume == first
    now = co.create_request(name="tiered", parameters=BRONZE,
                            mutable_parameters={"tier": "gold"})
    expect_code(co.stubs.controller.CreateVolume, now, ALREADY_EXISTS)


def test_retry_of_the_original_create_still_matches_after_an_expansion(co):
    first = co.create(name="grown", size=SMALL, limit=SMALL)
    ok(co.stubs.controller.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(
        volume_id=first.volume_id, capacity_range=csi_pb2.CapacityRange(
            required_bytes=2 * SMALL)))
    again = ok(co.stubs.controller.CreateVolume,
               co.create_request(name="grown", size=SMALL, limit=SMALL)).volume
    assert again.volume_id == first.volume_id and again.capacity_bytes == 2 * SMALL
    between = co.create_request(name="grown", size=SMALL + SMALL // 2,
                                limit=SMALL + SMALL // 2)
    expect_code(co.stubs.controller.CreateVolume, between, ALREADY_EXISTS)


def test_same_name_other_content_source_is_already_exists(co):
    source = co.create(name="source")
    co.create(name="plain")
    clone_of_source = csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=source.volume_id))
    expect_code(co.stubs.controller.CreateVolume,
                co.create_request(name="plain", volume_content_source=clone_of_source),
                ALREADY_EXISTS)
