"""Node error cases: (request, expected status code) tables, in both access types.

Required fields come before any lookup (the sanity suite sends fake IDs with the
missing field); an unknown volume is NOT_FOUND, except that unpublishing or unstaging it
where nothing is mounted is done (OK: the kubelet retries NOT_FOUND forever after a reboot
or a failover); NodeGetVolumeStats checks the volume first and the path second
('some/path' is NOT_FOUND, not INVALID_ARGUMENT).
"""

from __future__ import annotations

import functools
import os

import pytest

from proto import csi_pb2 as pb
from tests.conformance.helpers import (
    FAKE_VOLUME_ID,
    GIB,
    INVALID,
    NOT_FOUND,
    OK,
    UNKNOWN_VOLUME_IDS,
    capability,
    expect_code,
)


class Ctx:
    def __init__(self, co, access_type: str):
        self.co = co
        self.cap = capability(access_type)
        self.access_type = access_type

    @functools.cached_property
    def vol(self) -> str:
        return self.co.create(access_type=self.access_type).volume_id

    @functools.cached_property
    def staging(self) -> str:
        return self.co.staging_dir()

    @functools.cached_property
    def target(self) -> str:
        return self.co.target_path()


DEVICE = {"device": "/dev/mock"}  # what csi-sanity puts in publish_context

CASES = [
    # NodeStageVolume
    ("stage-no-id", "NodeStageVolume", lambda c: pb.NodeStageVolumeRequest(
        staging_target_path=c.staging, volume_capability=c.cap, publish_context=DEVICE), INVALID),
    ("stage-no-staging-path", "NodeStageVolume", lambda c: pb.NodeStageVolumeRequest(
        volume_id=FAKE_VOLUME_ID, volume_capability=c.cap, publish_context=DEVICE), INVALID),
    ("stage-fake-id-no-capability", "NodeStageVolume", lambda c: pb.NodeStageVolumeRequest(
        volume_id=FAKE_VOLUME_ID, staging_target_path=c.staging), INVALID),
    ("stage-no-capability", "NodeStageVolume", lambda c: pb.NodeStageVolumeRequest(
        volume_id=c.vol, staging_target_path=c.staging, publish_context=DEVICE), INVALID),
    ("stage-relative-path", "NodeStageVolume", lambda c: pb.NodeStageVolumeRequest(
        volume_id=c.vol, staging_target_path="some/path", volume_capability=c.cap), INVALID),
    ("stage-unknown-volume", "NodeStageVolume", lambda c: pb.NodeStageVolumeRequest(
        volume_id=FAKE_VOLUME_ID, staging_target_path=c.staging, volume_capability=c.cap),
        NOT_FOUND),
    # NodePublishVolume
    ("publish-nothing", "NodePublishVolume", lambda c: pb.NodePublishVolumeRequest(), INVALID),
    ("publish-no-target", "NodePublishVolume", lambda c: pb.NodePublishVolumeRequest(
        volume_id=FAKE_VOLUME_ID), INVALID),
    ("publish-fake-id-no-capability", "NodePublishVolume", lambda c: pb.NodePublishVolumeRequest(
        volume_id=FAKE_VOLUME_ID, target_path=c.target), INVALID),
    ("publish-no-capability", "NodePublishVolume", lambda c: pb.NodePublishVolumeRequest(
        volume_id=c.vol, target_path=c.target, staging_target_path=c.staging), INVALID),
    ("publish-relative-target", "NodePublishVolume", lambda c: pb.NodePublishVolumeRequest(
        volume_id=c.vol, target_path="some/path", staging_target_path=c.staging,
        volume_capability=c.cap), INVALID),
    ("publish-unknown-volume", "NodePublishVolume", lambda c: pb.NodePublishVolumeRequest(
        volume_id=FAKE_VOLUME_ID, target_path=c.target, staging_target_path=c.staging,
        volume_capability=c.cap), NOT_FOUND),
    # NodeUnpublishVolume
    ("unpublish-nothing", "NodeUnpublishVolume", lambda c: pb.NodeUnpublishVolumeRequest(),
        INVALID),
    ("unpublish-no-target", "NodeUnpublishVolume", lambda c: pb.NodeUnpublishVolumeRequest(
        volume_id=FAKE_VOLUME_ID), INVALID),
    ("unpublish-unknown-volume", "NodeUnpublishVolume", lambda c: pb.NodeUnpublishVolumeRequest(
        volume_id=FAKE_VOLUME_ID, target_path=c.target), OK),
    # NodeUnstageVolume
    ("unstage-no-id", "NodeUnstageVolume", lambda c: pb.NodeUnstageVolumeRequest(
        staging_target_path=c.staging), INVALID),
    ("unstage-no-staging-path", "NodeUnstageVolume", lambda c: pb.NodeUnstageVolumeRequest(
        volume_id=FAKE_VOLUME_ID), INVALID),
    ("unstage-unknown-volume", "NodeUnstageVolume", lambda c: pb.NodeUnstageVolumeRequest(
        volume_id=FAKE_VOLUME_ID, staging_target_path=c.staging), OK),
    # NodeGetVolumeStats
    ("stats-no-id", "NodeGetVolumeStats", lambda c: pb.NodeGetVolumeStatsRequest(
        volume_path="some/path"), INVALID),
    ("stats-no-path", "NodeGetVolumeStats", lambda c: pb.NodeGetVolumeStatsRequest(
        volume_id=FAKE_VOLUME_ID), INVALID),
    ("stats-unknown-volume", "NodeGetVolumeStats", lambda c: pb.NodeGetVolumeStatsRequest(
        volume_id=FAKE_VOLUME_ID, volume_path="some/path"), NOT_FOUND),
    ("stats-unknown-path", "NodeGetVolumeStats", lambda c: pb.NodeGetVolumeStatsRequest(
        volume_id=c.vol, volume_path="some/path"), NOT_FOUND),
    ("stats-not-staged", "NodeGetVolumeStats", lambda c: pb.NodeGetVolumeStatsRequest(
        volume_id=c.vol, volume_path=c.staging), NOT_FOUND),
    # NodeExpandVolume
    ("expand-no-id", "NodeExpandVolume", lambda c: pb.NodeExpandVolumeRequest(
        volume_path=c.co.root, volume_capability=c.cap), INVALID),
    ("expand-no-path", "NodeExpandVolume", lambda c: pb.NodeExpandVolumeRequest(
        volume_id=c.vol, volume_capability=c.cap), INVALID),
    ("expand-unknown-volume", "NodeExpandVolume", lambda c: pb.NodeExpandVolumeRequest(
        volume_id=FAKE_VOLUME_ID, volume_path="some/path",
        capacity_range=pb.CapacityRange(required_bytes=GIB)), NOT_FOUND),
]


@pytest.mark.parametrize("case_id, rpc, build, code", CASES, ids=[c[0] for c in CASES])
def test_node_error(co, access_type, case_id, rpc, build, code):
    ctx = Ctx(co, access_type)
    expect_code(getattr(co.stubs.node, rpc), build(ctx), code)
    if "target" in ctx.__dict__:
        assert not os.path.lexists(ctx.target), "a failed call must not make the target"
    if "staging" in ctx.__dict__:
        assert os.listdir(ctx.staging) == []


@pytest.mark.parametrize("volume_id", UNKNOWN_VOLUME_IDS)
def test_unknown_volume_ids(co, access_type, volume_id):
    c = Ctx(co, access_type)
    node = co.stubs.node
    for method, request in [
        (node.NodeStageVolume, pb.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=c.staging, volume_capability=c.cap)),
        (node.NodePublishVolume, pb.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=c.staging, target_path=c.target,
            volume_capability=c.cap)),
        (node.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
            volume_id=volume_id, volume_path=c.staging)),
        (node.NodeExpandVolume, pb.NodeExpandVolumeRequest(
            volume_id=volume_id, volume_path=c.staging)),
    ]:
        expect_code(method, request, NOT_FOUND)
    for method, request in [  # nothing of it here: done
        (node.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=c.target)),
        (node.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=c.staging)),
    ]:
        expect_code(method, request, OK)
    assert os.listdir(c.staging) == [] and not os.path.lexists(c.target)
