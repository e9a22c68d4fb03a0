"""Tiers end to end through the CSI socket: limits on a kubelet-like pod cgroup (real
cgroup v1 blkio here), changed online by ControllerModifyVolume, removed at unpublish,
re-applied after a restart; and admission of guaranteed minima."""

import os
import time

import grpc
import pytest

from csi import admin
from engine.qos import limits
from engine.qos.fio import FioJob
from proto import csi_pb2
from tests import support
from tests.bench.qos import BLKIO
from tests.integration.helpers import MIB, create_request, publish_request, stage_request

TOLERANCE = 0.15
POD_UID_KEY = "csi.storage.k8s.io/pod.uid"


def start(test_root, lab, **kw):
    return support.InProcessDriver(support.test_config(
        test_root, cgroup_parent=lab.parent_name, **kw))


def publish_to_pod(stubs, root, vol_id, uid):
    staging, target = f"{root}/staging", f"{root}/dev"
    os.makedirs(staging, exist_ok=True)
    stubs.node.NodeStageVolume(stage_request(vol_id, staging, block=True))
    req = publish_request(vol_id, staging, target, block=True)
    req.volume_context[POD_UID_KEY] = uid
    stubs.node.NodePublishVolume(req)
    stubs.node.NodePublishVolume(req)  # repeated by the kubelet: same rules
    return staging, target


def device_of(target: str) -> tuple[int, int]:
    st = os.stat(target)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def measured_read_iops(lab, container, target, seconds=2):
    result = lab.start_fio(container, FioJob(target, "randread", runtime_s=seconds, ramp_s=1,
                                             iodepth=16)).wait()
    return result.read_iops


def test_tier_limits_the_pod_changes_online_and_goes_at_unpublish(test_root, lab):
    d = start(test_root, lab)
    try:
        s = d.stubs
        vol = s.controller.CreateVolume(create_request(
            "q", size=128 * MIB, block=True, parameters={"maxReadIops": "600"})).volume
        uid, pod = lab.pod()
        container = lab.container(pod, "cri-containerd-app.scope")
        staging, target = publish_to_pod(s, test_root, vol.volume_id, uid)
        dev = device_of(target)
        assert limits.read_v1(container, dev).read_iops > 0  # v1: rules on every container
        iops = measured_read_iops(lab, container, target)
        assert abs(iops / 600 - 1) <= TOLERANCE, iops

        s.controller.ControllerModifyVolume(csi_pb2.ControllerModifyVolumeRequest(
            volume_id=vol.volume_id, mutable_parameters={"maxReadIops": "250"}))
        iops = measured_read_iops(lab, container, target)
        assert abs(iops / 250 - 1) <= TOLERANCE, iops

        # the operator sees the pod's I/O rate per volume (tandem-admin io)
        load = lab.start_fio(container, FioJob(target, "randread", runtime_s=3, iodepth=16))
        time.sleep(1)
        rows = admin.io_report(d.driver.store, "/sys/fs/cgroup", lab.parent_name, 1.0)
        lab.stop(load)
        (row,) = [r for r in rows if r["volume_id"] == vol.volume_id]
        assert row["source"] == "pod cgroup" and row["pod_uid"] == uid
        assert 0.5 * 250 < row["read_iops"] < 1.5 * 250, row
        (info,) = [v for v in admin.volumes_report(d.driver.store)
                   if v["volume_id"] == vol.volume_id]
        assert info["max_read_iops"] == 250 and info["published"][0]["pod_uid"] == uid

        # a container started after the publish gets its share of the rules too
        late = lab.container(pod, "cri-containerd-late.scope")
        support_wait(lambda: limits.read_v1(late, dev).read_iops > 0)

        s.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vol.volume_id, target_path=target))
        for cg in (pod, container, late):
            assert limits.read_v1(cg, dev).unlimited
        s.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging))
    finally:
        d.close()


def support_wait(cond, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_rules_come_back_after_a_restart(test_root, lab):
    d = start(test_root, lab)
    uid, pod = lab.pod()
    container = lab.container(pod)
    try:
        vol = d.stubs.controller.CreateVolume(create_request(
            "r", block=True, parameters={"tier": "bronze"})).volume
        staging, target = publish_to_pod(d.stubs, test_root, vol.volume_id, uid)
        dev = device_of(target)
    finally:
        d.close()
    # something (a node reboot of the cgroup tree, an operator) wiped the rules meanwhile
    for cg in (pod, container):
        for name in limits.V1_FILES.values():
            with open(os.path.join(cg, name), "w") as f:
                f.write(f"{dev[0]}:{dev[1]} 0")
    assert limits.read_v1(container, dev).unlimited
    d = start(test_root, lab)
    try:
        assert limits.read_v1(container, dev).read_iops > 0
        d.stubs.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vol.volume_id, target_path=target))
        d.stubs.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging))
    finally:
        d.close()


def test_guaranteed_minima_are_admitted_against_the_node_capacity(test_root, lab):
    # gold guarantees 4000 IOPS; this node can promise 5000
    d = start(test_root, lab, node_iops_capacity=5000)
    try:
        s = d.stubs
        gold = {"tier": "gold"}

        def capacity(params):
            return s.controller.GetCapacity(csi_pb2.GetCapacityRequest(
                parameters=params)).available_capacity

        assert capacity(gold) > 0
        first = s.controller.CreateVolume(create_request("g1", parameters=gold)).volume
        assert capacity(gold) == 0  # the scheduler will not pick this node for gold
        assert capacity({"tier": "silver"}) > 0
        with pytest.raises(grpc.RpcError) as e:
            s.controller.CreateVolume(create_request("g2", parameters=gold))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        other = s.controller.CreateVolume(create_request("b1", parameters={"tier": "bronze"}))
        with pytest.raises(grpc.RpcError) as e:  # no room now: the resizer retries
            s.controller.ControllerModifyVolume(csi_pb2.ControllerModifyVolumeRequest(
                volume_id=other.volume.volume_id, mutable_parameters=gold))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as e:  # can never fit: a permanent problem
            s.controller.ControllerModifyVolume(csi_pb2.ControllerModifyVolumeRequest(
                volume_id=other.volume.volume_id, mutable_parameters={"minReadIops": "9000"}))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        s.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=first.volume_id))
        s.controller.ControllerModifyVolume(csi_pb2.ControllerModifyVolumeRequest(
            volume_id=other.volume.volume_id, mutable_parameters=gold))
    finally:
        d.close()


def test_blkio_is_this_machines_controller():
    assert os.path.isfile(os.path.join(BLKIO, "blkio.throttle.read_iops_device"))
