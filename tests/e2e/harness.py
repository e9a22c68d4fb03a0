"""Where the replay sends its calls, and the Kubernetes objects it starts from.

A Target offers the controller's CSI stubs (the sidecars' socket) and each node's (the
kubelet's socket on that node). AllInOne is one tandem-csi serving both; a cluster target
(a controller socket and a node socket per node, from the 3-zone harness) offers the same
two methods, and the replay runs unchanged.
"""

from __future__ import annotations

import glob
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml

from csi.config import DRIVER_NAME
from proto import csi_pb2
from tests.support import Stubs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Target(Protocol):
    kubelet_root: str

    def controller(self) -> Stubs: ...

    def node(self, node_name: str) -> Stubs: ...

    def node_names(self) -> list[str]: ...


@dataclass
class AllInOne:
    """One driver: the controller and the one node it serves share its socket."""

    stubs: Stubs
    node_name: str
    kubelet_root: str

    def controller(self) -> Stubs:
        return self.stubs

    def node(self, node_name: str) -> Stubs:
        assert node_name == self.node_name, f"the all-in-one driver serves {self.node_name} only"
        return self.stubs

    def node_names(self) -> list[str]:
        return [self.node_name]


# -- the manifests ---------------------------------------------------------------------------
def deploy_objects(kind: str) -> list[dict]:
    found = []
    for path in sorted(glob.glob(os.path.join(REPO, "deploy", "*.yaml"))):
        with open(path) as f:
            found += [d for d in yaml.safe_load_all(f) if d and d.get("kind") == kind]
    return found


def deploy_object(kind: str, name: str) -> dict:
    (found,) = [d for d in deploy_objects(kind) if d["metadata"]["name"] == name]
    return found


# -- the cluster's objects -------------------------------------------------------------------
@dataclass
class Cluster:
    """Node and CSINode objects as the kubelet's registration leaves them: the driver's
    NodeGetInfo gives the CSINode's nodeID and topology keys, and its segments become Node
    labels. Nodes the target does not serve can be added as other zones' nodes."""

    nodes: list[dict] = field(default_factory=list)
    csinodes: list[dict] = field(default_factory=list)

    def register(self, name: str, info: csi_pb2.NodeGetInfoResponse,
                 zone_label: str = "") -> None:
        labels = {"kubernetes.io/hostname": name, **dict(info.accessible_topology.segments)}
        if zone_label:
            labels["topology.kubernetes.io/zone"] = zone_label
        self.nodes.append({"metadata": {"name": name, "labels": labels}})
        self.csinodes.append({"metadata": {"name": name}, "spec": {"drivers": [{
            "name": DRIVER_NAME, "nodeID": info.node_id,
            "topologyKeys": sorted(info.accessible_topology.segments)}]}})

    def add_node_without_driver(self, name: str) -> None:
        self.nodes.append({"metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name}}})
        self.csinodes.append({"metadata": {"name": name}, "spec": {"drivers": []}})

    def csinode(self, name: str) -> dict:
        return next(c for c in self.csinodes if c["metadata"]["name"] == name)


def pvc(name: str, storage_class: str, size: str, *, namespace: str = "app",
        block: bool = False, selected_node: str = "", vac: str = "",
        modes: tuple[str, ...] = ("ReadWriteOnce",), annotations: dict | None = None) -> dict:
    ann = dict(annotations or {})
    if selected_node:
        ann["volume.kubernetes.io/selected-node"] = selected_node
    spec: dict[str, Any] = {"accessModes": list(modes), "storageClassName": storage_class,
                            "volumeMode": "Block" if block else "Filesystem",
                            "resources": {"requests": {"storage": size}}}
    if vac:
        spec["volumeAttributesClassName"] = vac
    return {"metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                         "annotations": ann}, "spec": spec}


def pod(name: str, node_name: str, *, namespace: str = "app") -> dict:
    return {"metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4())},
            "spec": {"nodeName": node_name, "serviceAccountName": "web"}}


def volume_snapshot(name: str, *, namespace: str = "app") -> dict:
    return {"metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4())}}
