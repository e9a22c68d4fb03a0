"""kill -9 inside each RPC, at each named step; a restart plus the CO's retry must end
with the operation done once and nothing orphaned (file, loop device or mount)."""

import os
import signal

import grpc
import pytest

from proto import csi_pb2
from tests.conftest import etcd_namespace
from tests.integration.helpers import (
    create_request,
    mounts_under,
    pool_files,
    publish_request,
    stage_request,
    volume_loops,
)
from tests.support import DriverProcess

# step of the lifecycle -> crash points inside it
POINTS = {
    "create": ["create-volume-after-intent", "volume-create-after-record",
               "create-volume-after-engine"],
    "stage": ["stage-after-intent", "stage-after-attach", "stage-after-mount"],
    "publish": ["publish-after-intent", "publish-after-mount"],
    "unpublish": ["unpublish-after-unmount"],
    "unstage": ["unstage-after-unmount"],
    "delete": ["volume-delete-after-file", "delete-volume-after-engine"],
}
# points only a filesystem volume passes (making its filesystem)
MOUNT_ONLY = {"stage": ["stage-format-started", "stage-after-mkfs"]}
CASES = [(step, point, block) for step, points in POINTS.items() for point in points
         for block in (False, True)]
CASES += [(step, point, False) for step, points in MOUNT_ONLY.items() for point in points]



@pytest.mark.parametrize("store", ["sqlite", "etcd"])
@pytest.mark.parametrize("step, point, block", CASES,
                         ids=[f"{p}-{'block' if b else 'mount'}" for _, p, b in CASES])
def test_crash_then_retry_converges(request, test_root, step, point, block, store):
    extra = []
    if store == "etcd":
        extra = ["--store", request.getfixturevalue("etcd_url"),
                 "--store-namespace", etcd_namespace()]
    proc = DriverProcess(test_root, extra=extra)
    staging, target = f"{test_root}/staging", f"{test_root}/target"
    os.makedirs(staging)
    state = {}

    def run(stubs, which):
        if which == "create":
            state["id"] = stubs.controller.CreateVolume(
                create_request("crash-me", block=block)).volume.volume_id
        elif which == "stage":
            stubs.node.NodeStageVolume(stage_request(state["id"], staging, block))
        elif which == "publish":
            stubs.node.NodePublishVolume(publish_request(state["id"], staging, target, block))
        elif which == "unpublish":
            stubs.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=state["id"], target_path=target))
        elif which == "unstage":
            stubs.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                volume_id=state["id"], staging_target_path=staging))
        elif which == "delete":
            stubs.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=state["id"]))

    try:
        # armed from the start: the point fires only inside `step`
        proc.start(env={"TANDEM_CRASH_AT": point})
        for which in POINTS:
            if which != step:
                run(proc.stubs(), which)
                continue
            with pytest.raises(grpc.RpcError) as err:
                run(proc.stubs(), which)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert proc.wait_exit() == -signal.SIGKILL
            proc.start()
            if which == "create":
                # no half-made volume is ever listed
                listed = proc.stubs().controller.ListVolumes(csi_pb2.ListVolumesRequest())
                assert len(listed.entries) in (0, 1)
            run(proc.stubs(), which)  # the CO's retry
            if which == "create":
                listed = proc.stubs().controller.ListVolumes(csi_pb2.ListVolumesRequest())
                assert [e.volume.volume_id for e in listed.entries] == [state["id"]]
        proc.stop()
        # after the whole lifecycle nothing of the volume is left anywhere
        proc.start()
        assert proc.stubs().controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries == []
        assert pool_files(test_root) == []
        assert volume_loops(test_root) == []
        assert mounts_under(test_root) == []
        assert not os.path.exists(target)
        assert os.listdir(staging) == []
    finally:
        proc.stop(signal.SIGKILL)
