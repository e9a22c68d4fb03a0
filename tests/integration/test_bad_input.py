"""Bad input gets a clear error and changes nothing; secrets never reach the log."""

import os
import signal
import subprocess
import time

import grpc
import pytest

from proto import csi_pb2
from tests import support
from tests.integration.helpers import (
    MIB,
    capability,
    create_request,
    pool_files,
    publish_request,
    stage_request,
)

SENTINEL = "s3cr3t-SENTINEL-9f2c"


def code_of(call, request):
    with pytest.raises(grpc.RpcError) as e:
        call(request)
    return e.value.code(), e.value.details()


def assert_nothing_made(stubs, root):
    assert stubs.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries == []
    assert pool_files(root) == []


@pytest.mark.parametrize("size, code", [
    (2**62, grpc.StatusCode.OUT_OF_RANGE),  # absurd
    (300 * 1024**4, grpc.StatusCode.OUT_OF_RANGE),  # above the largest volume
    (100 * 1024**4, grpc.StatusCode.RESOURCE_EXHAUSTED),  # more than the pool can promise
])
def test_sizes_that_cannot_be_served(stubs, test_root, size, code):
    got, details = code_of(stubs.controller.CreateVolume, create_request("big", size=size))
    assert got == code and details
    assert_nothing_made(stubs, test_root)


@pytest.mark.parametrize("name", ["nul\0byte", "ctl\x07char", "x" * 5000])
def test_bad_names(stubs, test_root, name):
    got, _ = code_of(stubs.controller.CreateVolume, create_request(name))
    assert got == grpc.StatusCode.INVALID_ARGUMENT
    assert_nothing_made(stubs, test_root)


def test_unknown_parameter_changes_nothing(stubs, test_root):
    req = create_request("p", parameters={"tier": "gold", "replicaz": "3"})
    assert code_of(stubs.controller.CreateVolume, req)[0] == grpc.StatusCode.INVALID_ARGUMENT
    req = create_request("p", parameters={"tier": "diamond"})
    assert code_of(stubs.controller.CreateVolume, req)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert_nothing_made(stubs, test_root)
    # sidecar keys are ignored, not refused
    ok = create_request("p", parameters={"tier": "gold", "csi.storage.k8s.io/pvc/name": "x"})
    assert stubs.controller.CreateVolume(ok).volume.volume_id


@pytest.mark.parametrize("volume_id", ["../../etc/passwd", "vol-../x", "/dev/sda", "x" * 300])
def test_malformed_ids_are_not_found_and_never_paths(stubs, test_root, volume_id):
    os.makedirs(f"{test_root}/st")
    for call, req in [
        (stubs.controller.ControllerGetVolume, csi_pb2.ControllerGetVolumeRequest(
            volume_id=volume_id)),
        (stubs.node.NodeStageVolume, stage_request(volume_id, f"{test_root}/st")),
        (stubs.node.NodeGetVolumeStats, csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume_id, volume_path="/etc")),
    ]:
        assert code_of(call, req)[0] == grpc.StatusCode.NOT_FOUND
    # deleting what never existed is OK (idempotent), and touches nothing
    stubs.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
    assert os.path.exists("/etc/passwd")


def test_relative_and_nul_paths_are_refused(stubs, test_root):
    vol = stubs.controller.CreateVolume(create_request("paths")).volume
    for path in ["relative/dir", f"{test_root}/a\0b"]:
        got, _ = code_of(stubs.node.NodeStageVolume, stage_request(vol.volume_id, path))
        assert got == grpc.StatusCode.INVALID_ARGUMENT


def test_allowed_roots_refuse_traversal(test_root):
    allowed = f"{test_root}/kubelet"
    os.makedirs(f"{allowed}/staging")
    d = support.InProcessDriver(support.test_config(test_root, allowed_path_roots=(allowed,)))
    try:
        vol = d.stubs.controller.CreateVolume(create_request("roots")).volume
        for bad in [f"{allowed}/../escape", "/etc/x", f"{test_root}/elsewhere"]:
            got, details = code_of(d.stubs.node.NodeStageVolume,
                                   stage_request(vol.volume_id, bad))
            assert got == grpc.StatusCode.INVALID_ARGUMENT
            assert "outside" in details or "system tree" in details
        d.stubs.node.NodeStageVolume(stage_request(vol.volume_id, f"{allowed}/staging"))
        d.stubs.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=f"{allowed}/staging"))
    finally:
        d.close()


def test_full_pool(test_root):
    """Fill a small pool through a volume: new volumes are refused, the volume says why."""
    d = support.InProcessDriver(support.test_config(test_root, pool_image_bytes=512 * MIB))
    try:
        stubs = d.stubs
        vol = stubs.controller.CreateVolume(create_request("filler", size=600 * MIB,
                                                           block=True)).volume
        staging, target = f"{test_root}/staging", f"{test_root}/dev"
        os.makedirs(staging)
        stubs.node.NodeStageVolume(stage_request(vol.volume_id, staging, block=True))
        stubs.node.NodePublishVolume(publish_request(vol.volume_id, staging, target, block=True))
        # fill it: the pool runs out before the volume does
        subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=4M", "oflag=direct",
                        "status=none"], capture_output=True)
        got, details = code_of(stubs.controller.CreateVolume, create_request("more"))
        assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and "available" in details
        cond = stubs.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id)).status.volume_condition
        assert cond.abnormal and "full" in cond.message
        listed = stubs.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
        assert [e.volume.volume_id for e in listed] == [vol.volume_id]
        stubs.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vol.volume_id, target_path=target))
        stubs.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging))
        stubs.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
        # space comes back (btrfs frees a deleted subvolume in the background)
        deadline = time.monotonic() + 30
        while True:
            try:
                assert stubs.controller.CreateVolume(create_request("more")).volume.volume_id
                break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        d.close()


def test_secrets_never_reach_the_log(test_root):
    proc = support.DriverProcess(test_root, extra=["--log-level", "DEBUG"],
                                 env={"GRPC_VERBOSITY": "DEBUG", "GRPC_TRACE": "api"})
    proc.start()
    try:
        stubs = proc.stubs()
        secrets = {"password": SENTINEL}
        os.makedirs(f"{test_root}/st")
        vol = stubs.controller.CreateVolume(create_request("sec", secrets=secrets)).volume
        stubs.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=f"{test_root}/st",
            volume_capability=capability(), secrets=secrets))
        for call, req in [  # failing requests carry secrets too
            (stubs.controller.CreateVolume, create_request("", secrets=secrets)),
            (stubs.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
                volume_id="vol-" + "0" * 32, staging_target_path="/x",
                volume_capability=capability(), secrets=secrets)),
            (stubs.controller.ControllerPublishVolume, csi_pb2.ControllerPublishVolumeRequest(
                volume_id=vol.volume_id, node_id="nope", volume_capability=capability(),
                secrets=secrets)),
        ]:
            with pytest.raises(grpc.RpcError):
                call(req)
        stubs.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=f"{test_root}/st"))
    finally:
        proc.stop(signal.SIGTERM)
    with open(proc.log_path, encoding="utf-8", errors="replace") as f:
        log = f.read()
    assert "created volume" in log  # the log is really there
    assert SENTINEL not in log
