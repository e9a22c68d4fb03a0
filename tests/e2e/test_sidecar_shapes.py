"""The replay's request builders on their own (no driver, no root): the shapes the
provisioner and the snapshotter give their requests, checked against what their sources do
(see tests/e2e/sidecars.py)."""

from __future__ import annotations

import hashlib

import pytest

from csi.config import DRIVER_NAME
from proto import csi_pb2
from tests.e2e import sidecars as sc_
from tests.e2e.harness import Cluster, deploy_object, pvc, volume_snapshot

NODE_KEY, ZONE_KEY = "topology.tandem.csi.dev/node", "topology.tandem.csi.dev/zone"


def three_zones() -> Cluster:
    cluster = Cluster()
    for name, zone in (("node-c", "zone-c"), ("node-a", "zone-a"), ("node-b", "zone-b")):
        cluster.register(name, csi_pb2.NodeGetInfoResponse(
            node_id=name, accessible_topology=csi_pb2.Topology(segments={
                NODE_KEY: name, ZONE_KEY: zone})))
    cluster.add_node_without_driver("node-x")
    return cluster


def segments(topologies) -> list[tuple[str, str]]:
    return [(t.segments[NODE_KEY], t.segments[ZONE_KEY]) for t in topologies]


def test_requisite_is_every_node_sorted_and_preferred_starts_at_the_selected_one():
    cluster = three_zones()
    req = sc_.accessibility_requirements(DRIVER_NAME, cluster.nodes, cluster.csinodes,
                                         "node-b")
    assert segments(req.requisite) == [("node-a", "zone-a"), ("node-b", "zone-b"),
                                       ("node-c", "zone-c")]
    assert segments(req.preferred) == [("node-b", "zone-b"), ("node-c", "zone-c"),
                                       ("node-a", "zone-a")]


def test_allowed_topologies_are_flattened_and_the_selected_node_must_lie_in_them():
    cluster = three_zones()
    allowed = [{"matchLabelExpressions": [{"key": ZONE_KEY, "values": ["zone-b", "zone-a"]}]}]
    req = sc_.accessibility_requirements(DRIVER_NAME, cluster.nodes, cluster.csinodes,
                                         "node-b", allowed)
    assert [dict(t.segments) for t in req.requisite] == [{ZONE_KEY: "zone-a"},
                                                         {ZONE_KEY: "zone-b"}]
    assert dict(req.preferred[0].segments) == {ZONE_KEY: "zone-b"}
    with pytest.raises(sc_.ProvisioningError):
        sc_.accessibility_requirements(DRIVER_NAME, cluster.nodes, cluster.csinodes,
                                       "node-c", allowed)
    with pytest.raises(sc_.ProvisioningError):  # a node without the driver
        sc_.accessibility_requirements(DRIVER_NAME, cluster.nodes, cluster.csinodes, "node-x")


def test_parameters_are_stripped_and_unknown_reserved_keys_refused():
    cluster = three_zones()
    sc = deploy_object("StorageClass", "tandem-gold-r3")
    claim = pvc("data", "tandem-gold-r3", "1Gi", selected_node="node-a",
                modes=("ReadWriteOncePod",))
    req = sc_.create_volume_request(driver=DRIVER_NAME, pvc=claim, sc=sc, nodes=cluster.nodes,
                                    csinodes=cluster.csinodes,
                                    vac=deploy_object("VolumeAttributesClass", "tandem-bronze"))
    assert req.parameters["tier"] == "gold" and req.parameters["replicas"] == "3"
    assert "csi.storage.k8s.io/fstype" not in req.parameters
    assert dict(req.mutable_parameters) == {"tier": "bronze"}
    assert req.capacity_range.required_bytes == 1 << 30 and not req.capacity_range.limit_bytes
    assert req.volume_capabilities[0].access_mode.mode == \
        csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_SINGLE_WRITER
    bad = {**sc, "parameters": {**sc["parameters"], "csi.storage.k8s.io/typo": "x"}}
    with pytest.raises(sc_.ProvisioningError, match="reserved"):
        sc_.create_volume_request(driver=DRIVER_NAME, pvc=claim, sc=bad, nodes=cluster.nodes,
                                  csinodes=cluster.csinodes)


def test_secret_templates_resolve_as_the_provisioner_resolves_them():
    claim = pvc("db", "x", "1Gi", namespace="shop", annotations={"team": "blue"})
    params = {"csi.storage.k8s.io/provisioner-secret-name": "${pvc.annotations['team']}-key",
              "csi.storage.k8s.io/provisioner-secret-namespace": "${pvc.namespace}"}
    assert sc_.secret_reference(params, *sc_.PROVISIONER_SECRET_KEYS, "pvc-1", claim) == \
        ("shop", "blue-key")
    with pytest.raises(sc_.ProvisioningError):  # the namespace may not use the claim's name
        sc_.secret_reference({**params, "csi.storage.k8s.io/provisioner-secret-namespace":
                              "${pvc.name}"}, *sc_.PROVISIONER_SECRET_KEYS, "pvc-1", claim)


def test_snapshot_requests_carry_the_snapshotters_name_and_metadata():
    vs = volume_snapshot("nightly", namespace="shop")
    pv = {"spec": {"csi": {"volumeHandle": "vol-1"}}}
    req = sc_.create_snapshot_request(deploy_object("VolumeSnapshotClass", "tandem"), vs, pv,
                                      content_name="snapcontent-1")
    assert req.name == f"snapshot-{vs['metadata']['uid']}"
    assert req.source_volume_id == "vol-1"
    assert dict(req.parameters) == {
        "csi.storage.k8s.io/volumesnapshot/name": "nightly",
        "csi.storage.k8s.io/volumesnapshot/namespace": "shop",
        "csi.storage.k8s.io/volumesnapshotcontent/name": "snapcontent-1"}


def test_kubelet_paths():
    pv = {"metadata": {"name": "pvc-1"},
          "spec": {"volumeMode": "Filesystem", "csi": {"volumeHandle": "vol-1"}}}
    a_pod = {"metadata": {"uid": "u1"}}
    staging = sc_.staging_path("/var/lib/kubelet", DRIVER_NAME, pv)
    digest = hashlib.sha256(b"vol-1").hexdigest()
    assert staging == \
        f"/var/lib/kubelet/plugins/kubernetes.io/csi/tandem.csi.dev/{digest}/globalmount"
    assert sc_.target_path("/var/lib/kubelet", pv, a_pod) == \
        "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pvc-1/mount"
    pv["spec"]["volumeMode"] = "Block"
    assert sc_.staging_path("/k", DRIVER_NAME, pv) == \
        "/k/plugins/kubernetes.io/csi/volumeDevices/staging/pvc-1"
    assert sc_.target_path("/k", pv, a_pod) == \
        "/k/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-1/u1"
