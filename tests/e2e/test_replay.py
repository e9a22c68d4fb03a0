"""End to end from the manifests: the calls the sidecars and the kubelet would make for a
PVC of each deploy/ StorageClass, replayed against the driver (tests/e2e/sidecars.py says
which upstream code each request follows).

It runs against the all-in-one driver now (one node, node-a in zone-a; node-b and node-c
stand for other zones' nodes, node-x runs no Tandem); the Target in harness.py is what a
cluster run replaces with the controller's socket and one socket per node.
"""

from __future__ import annotations

import copy
import os

import grpc
import pytest

from csi.config import DRIVER_NAME
from proto import csi_pb2
from tests import support
from tests.conformance.helpers import block_device_size, fs_size, mounts_under
from tests.e2e import sidecars as sc_
from tests.e2e.harness import (
    AllInOne,
    Cluster,
    deploy_object,
    deploy_objects,
    pod,
    pvc,
    volume_snapshot,
)

MIB = 1024 * 1024
TOPOLOGY_NODE_KEY = "topology.tandem.csi.dev/node"
TOPOLOGY_ZONE_KEY = "topology.tandem.csi.dev/zone"


@pytest.fixture
def target(test_root):
    kubelet = f"{test_root}/kubelet"
    os.makedirs(kubelet)
    config = support.test_config(test_root, allowed_path_roots=(kubelet,))
    driver = support.InProcessDriver(config)
    try:
        yield AllInOne(driver.stubs, config.node_id, kubelet)
    finally:
        driver.close()


def registered(target) -> Cluster:
    """The kubelet registered the driver on each node the target serves; two more zones'
    nodes carry the same topology keys (as their own registration would give them), and one
    node runs no Tandem."""
    cluster = Cluster()
    for name in target.node_names():
        cluster.register(name, target.node(name).node.NodeGetInfo(
            csi_pb2.NodeGetInfoRequest()))
    served = {n["metadata"]["name"] for n in cluster.nodes}
    for name, zone in (("node-b", "zone-b"), ("node-c", "zone-c")):
        if name not in served:
            cluster.register(name, csi_pb2.NodeGetInfoResponse(
                node_id=name, accessible_topology=csi_pb2.Topology(segments={
                    TOPOLOGY_NODE_KEY: name, TOPOLOGY_ZONE_KEY: zone})))
    cluster.add_node_without_driver("node-x")
    return cluster


def twice(method, request):
    """Sidecars retry: every call is made twice and must answer the same."""
    first = method(request)
    assert method(request) == first, method
    return first


def csidriver() -> dict:
    return deploy_object("CSIDriver", DRIVER_NAME)["spec"]


class Kubelet:
    """The node side of one pod's volume, as the kubelet drives it."""

    def __init__(self, target, cluster: Cluster, pv: dict, node_name: str, attach: bool):
        self.target, self.pv, self.node_name = target, pv, node_name
        self.stubs = target.node(node_name)
        self.node_id = sc_.node_id_of(cluster.csinode(node_name), DRIVER_NAME)
        self.attach = attach
        self.publish_context: dict[str, str] = {}
        self.staging = sc_.staging_path(target.kubelet_root, DRIVER_NAME, pv)

    def start(self, a_pod: dict) -> str:
        if self.attach:  # the external-attacher's ControllerPublish, before the kubelet
            rsp = twice(self.target.controller().controller.ControllerPublishVolume,
                        sc_.controller_publish_request(self.pv, self.node_id))
            self.publish_context = dict(rsp.publish_context)
        twice(self.stubs.node.NodeStageVolume,
              sc_.node_stage_request(self.pv, self.staging, self.publish_context))
        target = sc_.target_path(self.target.kubelet_root, self.pv, a_pod)
        twice(self.stubs.node.NodePublishVolume, sc_.node_publish_request(
            self.pv, self.staging, target, self.publish_context, a_pod))
        return target

    def stop(self, target: str) -> None:
        handle = self.pv["spec"]["csi"]["volumeHandle"]
        twice(self.stubs.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=handle, target_path=target))
        twice(self.stubs.node.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(
            volume_id=handle, staging_target_path=self.staging))
        if self.attach:  # the pod is gone: the attach/detach controller detaches
            twice(self.target.controller().controller.ControllerUnpublishVolume,
                  csi_pb2.ControllerUnpublishVolumeRequest(volume_id=handle,
                                                           node_id=self.node_id))


def provision(target, cluster: Cluster, claim: dict, sc: dict, **kw):
    req = sc_.create_volume_request(driver=DRIVER_NAME, pvc=claim, sc=sc, nodes=cluster.nodes,
                                    csinodes=cluster.csinodes, **kw)
    rsp = twice(target.controller().controller.CreateVolume, req)
    return req, rsp, sc_.persistent_volume(req, rsp, claim, sc, DRIVER_NAME)


def delete(target, pv: dict) -> None:
    twice(target.controller().controller.DeleteVolume,
          csi_pb2.DeleteVolumeRequest(volume_id=pv["spec"]["csi"]["volumeHandle"]))


def test_a_claim_of_the_default_class_through_every_sidecar(target):
    """tandem-silver (the default class, ext4): capacity, provisioning, attach, stage and
    publish with pod info, a snapshot and a claim restored from it, a tier change through a
    VolumeAttributesClass, and the way out. (Expansion: the two tests below.)"""
    driver_spec = csidriver()
    attach = driver_spec["attachRequired"]
    cluster = registered(target)
    sc = deploy_object("StorageClass", "tandem-silver")
    node = target.node_names()[0]

    # capacity tracking: GetCapacity per segment, with the class's parameters as they are
    node_term = {k: v for k, v in cluster.nodes[0]["metadata"]["labels"].items()
                 if k.startswith("topology.tandem")}
    segments = sc_.capacity_segments(DRIVER_NAME, cluster.nodes, cluster.csinodes)
    assert node_term in segments and len(segments) == 3  # node-x has no segment
    capacity = {tuple(sorted(s.items())): target.controller().controller.GetCapacity(
        sc_.capacity_request(sc, s)).available_capacity for s in segments}
    assert capacity[tuple(sorted(node_term.items()))] >= 256 * MIB

    # the external-provisioner
    claim = pvc("data-web-0", "tandem-silver", "256Mi", selected_node=node)
    req, rsp, pv = provision(target, cluster, claim, sc)
    assert req.name == f"pvc-{claim['metadata']['uid']}"
    assert dict(req.parameters) == {"tier": "silver", "csi.storage.k8s.io/pvc/name": "data-web-0",
                                    "csi.storage.k8s.io/pvc/namespace": "app",
                                    "csi.storage.k8s.io/pv/name": req.name}
    (cap,) = req.volume_capabilities
    assert cap.mount.fs_type == "ext4"
    assert cap.access_mode.mode == csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_MULTI_WRITER
    assert len(req.accessibility_requirements.requisite) == 3
    assert dict(req.accessibility_requirements.preferred[0].segments) == node_term
    assert rsp.volume.capacity_bytes == 256 * MIB
    requisite = [dict(t.segments) for t in req.accessibility_requirements.requisite]
    for topo in rsp.volume.accessible_topology:
        assert any(dict(topo.segments).items() <= r.items() for r in requisite)
    node_obj = next(n for n in cluster.nodes if n["metadata"]["name"] == node)
    assert sc_.node_matches(node_obj, pv["spec"]["nodeAffinity"])  # the pod can run there

    # a pod on the selected node (podInfoOnMount: its identity reaches NodePublish)
    assert driver_spec["podInfoOnMount"] is True
    kubelet = Kubelet(target, cluster, pv, node, attach)
    web0 = pod("web-0", node)
    mounted = kubelet.start(web0)
    with open(f"{mounted}/hello", "w") as f:
        f.write("from web-0")

    # the external-snapshotter, and a claim restored from its snapshot
    vsc = deploy_object("VolumeSnapshotClass", "tandem")
    vs = volume_snapshot("snap-1")
    snap = twice(target.controller().controller.CreateSnapshot, sc_.create_snapshot_request(
        vsc, vs, pv, content_name=f"snapcontent-{vs['metadata']['uid']}")).snapshot
    assert snap.ready_to_use and snap.source_volume_id == pv["spec"]["csi"]["volumeHandle"]
    restored_claim = pvc("restored", "tandem-silver", "256Mi", selected_node=node)
    source = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id))
    _, _, restored = provision(target, cluster, restored_claim, sc, source=source)
    reader = Kubelet(target, cluster, restored, node, attach)
    reader_pod = pod("reader", node)
    restored_at = reader.start(reader_pod)
    with open(f"{restored_at}/hello") as f:
        assert f.read() == "from web-0"
    reader.stop(restored_at)

    # the external-resizer with a VolumeAttributesClass: the tier changes in place
    vac = deploy_object("VolumeAttributesClass", "tandem-gold")
    twice(target.controller().controller.ControllerModifyVolume,
          sc_.modify_volume_request(pv, vac))
    with pytest.raises(grpc.RpcError) as bad:
        target.controller().controller.ControllerModifyVolume(sc_.modify_volume_request(
            pv, {"parameters": {"tier": "gold", "speed": "ludicrous"}}))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # the way out: pod gone, snapshot and claims deleted (reclaimPolicy Delete)
    kubelet.stop(mounted)
    assert not mounts_under(target.kubelet_root)
    twice(target.controller().controller.DeleteSnapshot,
          csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    delete(target, restored)
    delete(target, pv)
    listed = target.controller().controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert not listed.entries


def test_an_ext4_claim_expanded_while_unused_grows_at_its_next_stage(target):
    """The resizer expands a claim no pod uses; the next pod's kubelet stages it and calls
    NodeExpandVolume (the PVC's status still shows the old size): the filesystem must
    have the new size."""
    cluster = registered(target)
    sc = deploy_object("StorageClass", "tandem-silver")
    node = target.node_names()[0]
    _, _, pv = provision(target, cluster, pvc("logs", "tandem-silver", "64Mi",
                                              selected_node=node), sc)
    kubelet = Kubelet(target, cluster, pv, node, csidriver()["attachRequired"])
    mounted = kubelet.start(pod("app-0", node))
    with open(f"{mounted}/keep", "w") as f:
        f.write("kept")
    kubelet.stop(mounted)
    new_size = 256 * MIB
    grown = twice(target.controller().controller.ControllerExpandVolume,
                  sc_.controller_expand_request(pv, new_size))
    assert grown.capacity_bytes == new_size and grown.node_expansion_required
    mounted = kubelet.start(pod("app-0", node))
    try:
        twice(target.node(node).node.NodeExpandVolume,
              sc_.node_expand_request(pv, mounted, kubelet.staging, new_size))
        assert fs_size(mounted) > 200 * MIB
        with open(f"{mounted}/keep") as f:
            assert f.read() == "kept"
    finally:
        kubelet.stop(mounted)
        delete(target, pv)


def test_a_block_claim_grows_online(target):
    """tandem-gold, volumeMode Block: the device is published as a file, grown while in
    use (the loop device's capacity refreshed by NodeExpandVolume)."""
    cluster = registered(target)
    sc = deploy_object("StorageClass", "tandem-gold")
    node = target.node_names()[0]
    claim = pvc("raw", "tandem-gold", "64Mi", block=True, selected_node=node)
    req, _, pv = provision(target, cluster, claim, sc)
    assert req.volume_capabilities[0].WhichOneof("access_type") == "block"
    assert pv["spec"]["csi"]["fsType"] == ""
    kubelet = Kubelet(target, cluster, pv, node, csidriver()["attachRequired"])
    device = kubelet.start(pod("db-0", node))
    assert device.endswith(f"/volumeDevices/publish/{pv['metadata']['name']}/"
                           f"{device.rsplit('/', 1)[-1]}")
    assert block_device_size(device) == 64 * MIB
    grown = twice(target.controller().controller.ControllerExpandVolume,
                  sc_.controller_expand_request(pv, 128 * MIB))
    assert grown.node_expansion_required
    twice(target.node(node).node.NodeExpandVolume,
          sc_.node_expand_request(pv, device, kubelet.staging, 128 * MIB))
    assert block_device_size(device) == 128 * MIB
    kubelet.stop(device)
    delete(target, pv)


def test_mirrored_classes_need_zones_the_all_in_one_driver_does_not_have(target):
    """The replicas-3 classes ask for three zones: one node refuses them with a clear error
    and makes nothing (a cluster target provisions them)."""
    cluster = registered(target)
    node = target.node_names()[0]
    if len({n["metadata"]["labels"].get(TOPOLOGY_ZONE_KEY) for n in cluster.nodes
            if n["metadata"]["name"] in target.node_names()}) >= 3:
        pytest.fail("a 3-zone target: replay the full life of these classes instead")
    mirrored = [s for s in deploy_objects("StorageClass")
                if s["parameters"].get("replicas", "1") != "1"]
    assert len(mirrored) == 3
    for sc in mirrored:
        claim = pvc(f"m-{sc['metadata']['name']}", sc["metadata"]["name"], "64Mi",
                    selected_node=node)
        req = sc_.create_volume_request(driver=DRIVER_NAME, pvc=claim, sc=sc,
                                        nodes=cluster.nodes, csinodes=cluster.csinodes)
        assert req.parameters["replicas"] == "3"
        with pytest.raises(grpc.RpcError) as refused:
            target.controller().controller.CreateVolume(req)
        assert refused.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                        grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert refused.value.details()
    listed = target.controller().controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert not listed.entries


def test_a_class_with_secrets_hands_them_over_and_the_driver_ignores_them(target):
    """The provisioner resolves the secret a class names (templates from the claim) and
    passes its data; Tandem needs none and accepts them (never logging them)."""
    cluster = registered(target)
    sc = copy.deepcopy(deploy_object("StorageClass", "tandem-bronze"))
    sc["parameters"].update({
        "csi.storage.k8s.io/provisioner-secret-name": "${pvc.name}-creds",
        "csi.storage.k8s.io/provisioner-secret-namespace": "${pvc.namespace}"})
    secret = {"metadata": {"name": "data-creds", "namespace": "app"},
              "data": {"token": "c2VudGluZWwtc2VjcmV0"}}  # "sentinel-secret"
    claim = pvc("data", "tandem-bronze", "32Mi", selected_node=target.node_names()[0])
    req, rsp, pv = provision(target, cluster, claim, sc, secrets=[secret])
    assert dict(req.secrets) == {"token": "sentinel-secret"}
    assert not any(k.endswith("-secret-name") for k in req.parameters)
    delete(target, pv)
