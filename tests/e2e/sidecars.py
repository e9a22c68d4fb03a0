"""The CSI calls the upstream sidecars and the kubelet make, built from Kubernetes objects.

Objects are plain dicts as in deploy/ (StorageClass, VolumeSnapshotClass,
VolumeAttributesClass, Secret) or made by the tests (PVC, Node, CSINode, Pod). What each
function follows, in the sidecars' own sources:

- CreateVolume: external-provisioner v6.3.0 pkg/controller/controller.go,
  prepareProvision(): name = <--volume-name-prefix "pvc">-<PVC UID>; fsType from
  csi.storage.k8s.io/fstype (else --default-fstype); one capability per PVC access mode
  (getVolumeCapability: block or mount with the class's mountOptions; access modes through
  csi-lib-utils accessmodes.ToCSIAccessMode, RWO -> SINGLE_NODE_MULTI_WRITER when the
  driver has that capability); required_bytes = the PVC's storage request;
  removePrefixedParameters() strips the known csi.storage.k8s.io/ keys and refuses unknown
  ones; --extra-create-metadata adds pvc/name, pvc/namespace and pv/name; secrets through
  getSecretReference() (templates ${pv.name}, ${pvc.name}, ${pvc.namespace},
  ${pvc.annotations['...']}; the namespace template takes ${pv.name} and ${pvc.namespace}
  only), then the Secret's data; mutable_parameters = the PVC's VolumeAttributesClass's
  parameters.
- accessibility_requirements: pkg/controller/topology.go GenerateAccessibilityRequirements()
  with --strict-topology=false and a selected node (WaitForFirstConsumer): topology keys
  from the selected node's CSINode entry; requisite = the terms (key=value of every key) of
  every Node labelled with all those keys, sorted (fewer segments first, then keys and
  values) and deduplicated; preferred = requisite rotated so that the first term contained
  in the selected node's topology leads. allowedTopologies, when set, are flattened instead.
- PV nodeAffinity: GenerateVolumeNodeAffinity(): one node selector term per accessible
  topology, a `key In [value]` expression per segment.
- GetCapacity: pkg/capacity/capacity.go: the class's parameters as they are (prefixed keys
  included), no capabilities, one call per topology segment.
- ControllerPublish: external-attacher v4.12.0 pkg/controller/csi_handler.go + util.go
  GetVolumeCapabilities(): node ID from the CSINode, the capability from the PV (block, or
  mount with the PV's fsType and mountOptions; access mode as above), volume_context = the
  PV's volumeAttributes, readonly = the PV source's readOnly.
- CreateSnapshot: external-snapshotter v8.6.0 pkg/sidecar-controller/csi_handler.go
  makeSnapshotName(): snapshot-<VolumeSnapshot UID>; utils.RemovePrefixedParameters();
  --extra-create-metadata adds volumesnapshot/name, volumesnapshot/namespace and
  volumesnapshotcontent/name.
- ControllerExpandVolume / ControllerModifyVolume: external-resizer v2.2.1: the PV's handle,
  required_bytes = the new request, the PV's capability; mutable_parameters = the new
  VolumeAttributesClass's parameters.
- Node calls: the kubelet (pkg/volume/csi): staging path
  <root>/plugins/kubernetes.io/csi/<driver>/<sha256(volume handle)>/globalmount, target
  <root>/pods/<pod UID>/volumes/kubernetes.io~csi/<PV name>/mount; for block volumes
  <root>/plugins/kubernetes.io/csi/volumeDevices/staging/<PV name> and
  .../volumeDevices/publish/<PV name>/<pod UID>; publish_context from the attachment;
  podInfoOnMount adds csi.storage.k8s.io/pod.name, pod.namespace, pod.uid,
  serviceAccount.name and ephemeral to NodePublish's volume_context.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from proto import csi_pb2

PREFIX = "csi.storage.k8s.io/"
Mode = csi_pb2.VolumeCapability.AccessMode

PROVISIONER_SECRET_KEYS = (PREFIX + "provisioner-secret-name",
                           PREFIX + "provisioner-secret-namespace")
_PROVISIONER_KNOWN = {PREFIX + k for k in (
    "fstype", "secret-name", "secret-namespace",
    *[f"{op}-secret-{part}" for op in ("provisioner", "controller-publish", "node-stage",
                                       "node-publish", "controller-expand", "node-expand",
                                       "controller-modify")
      for part in ("name", "namespace")])}
_SNAPSHOTTER_KNOWN = {PREFIX + f"{op}-secret-{part}"
                      for op in ("snapshotter", "snapshotter-list", "group-snapshotter",
                                 "group-snapshotter-get") for part in ("name", "namespace")}


class ProvisioningError(Exception):
    """What the sidecar would report as an event instead of calling the driver."""


# -- parameters and secrets ---------------------------------------------------------------------
def remove_prefixed(params: Mapping[str, str], known: set[str]) -> dict[str, str]:
    out = {}
    for key, value in params.items():
        if key.startswith(PREFIX):
            if key not in known:
                raise ProvisioningError(f"found unknown parameter key {key!r} with reserved "
                                        f"namespace {PREFIX}")
            continue
        out[key] = value
    return out


def _resolve(template: str, values: Mapping[str, str]) -> str:
    def one(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise ProvisioningError(f"template {template!r} uses {key!r}, not available here")
        return values[key]
    return re.sub(r"\$\{([^}]+)\}", one, template)


def secret_reference(params: Mapping[str, str], name_key: str, namespace_key: str,
                     pv_name: str, pvc: Mapping[str, Any]) -> tuple[str, str] | None:
    """(namespace, name) of the Secret a class names for one operation, templates resolved;
    None when it names none (the class-wide secret-name/secret-namespace as the fallback)."""
    name_t, ns_t = params.get(name_key, ""), params.get(namespace_key, "")
    if not name_t and not ns_t:
        name_t = params.get(PREFIX + "secret-name", "")
        ns_t = params.get(PREFIX + "secret-namespace", "")
    if not name_t and not ns_t:
        return None
    if not name_t or not ns_t:
        raise ProvisioningError(f"{name_key} and {namespace_key} go together")
    meta = pvc["metadata"]
    namespace = _resolve(ns_t, {"pv.name": pv_name, "pvc.namespace": meta["namespace"]})
    name_values = {"pv.name": pv_name, "pvc.name": meta["name"],
                   "pvc.namespace": meta["namespace"]}
    for key, value in (meta.get("annotations") or {}).items():
        name_values[f"pvc.annotations['{key}']"] = value
    name = _resolve(name_t, name_values)
    return namespace, name


def secret_data(secrets: Sequence[Mapping[str, Any]], ref: tuple[str, str] | None) -> dict:
    """The Secret's data as the sidecar reads it (decoded data; stringData as the API
    server would have merged it)."""
    if ref is None:
        return {}
    namespace, name = ref
    for s in secrets:
        if s["metadata"]["name"] == name and s["metadata"].get("namespace") == namespace:
            out = {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
            out.update(s.get("stringData") or {})
            return out
    raise ProvisioningError(f"secret {namespace}/{name} not found")


# -- capabilities ---------------------------------------------------------------------------------
def access_mode(pv_modes: Sequence[str], single_node_multi_writer: bool = True) -> int:
    modes = set(pv_modes)
    if "ReadWriteOncePod" in modes:
        return Mode.SINGLE_NODE_SINGLE_WRITER
    if "ReadWriteMany" in modes:
        return Mode.MULTI_NODE_MULTI_WRITER
    if "ReadOnlyMany" in modes:
        return Mode.MULTI_NODE_READER_ONLY
    if "ReadWriteOnce" in modes:
        return Mode.SINGLE_NODE_MULTI_WRITER if single_node_multi_writer \
            else Mode.SINGLE_NODE_WRITER
    raise ProvisioningError(f"unsupported access modes {pv_modes}")


def capability(block: bool, modes: Sequence[str], fs_type: str,
               mount_options: Sequence[str] = ()) -> csi_pb2.VolumeCapability:
    mode = csi_pb2.VolumeCapability.AccessMode(mode=access_mode(modes))
    if block:
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                        access_mode=mode)
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(
        fs_type=fs_type, mount_flags=list(mount_options)), access_mode=mode)


def fs_type_of(sc: Mapping[str, Any], default_fstype: str) -> str:
    found = [v for k, v in sc.get("parameters", {}).items()
             if k.lower() == "fstype" or k == PREFIX + "fstype"]
    if len(found) > 1:
        raise ProvisioningError("fstype given twice")
    return found[0] if found else default_fstype


# -- topology ------------------------------------------------------------------------------------
Term = tuple[tuple[str, str], ...]  # sorted (key, value) pairs


def _term_key(term: Term) -> tuple:
    return (len(term), term)


def _subset(small: Term, big: Term) -> bool:
    return set(small) <= set(big)


def topology_keys(csinode: Mapping[str, Any], driver: str) -> list[str]:
    for d in csinode["spec"]["drivers"]:
        if d["name"] == driver:
            return list(d.get("topologyKeys") or [])
    return []


def node_id_of(csinode: Mapping[str, Any], driver: str) -> str:
    for d in csinode["spec"]["drivers"]:
        if d["name"] == driver:
            return d["nodeID"]
    raise ProvisioningError(f"{csinode['metadata']['name']} has no {driver}")


def _node_term(node: Mapping[str, Any], keys: Sequence[str]) -> Term | None:
    labels = node["metadata"].get("labels") or {}
    if not all(k in labels for k in keys):
        return None
    return tuple(sorted((k, labels[k]) for k in keys))


def _flatten(allowed: Sequence[Mapping[str, Any]]) -> list[Term]:
    terms: list[Term] = []
    for selector in allowed:
        exprs = selector.get("matchLabelExpressions") or []
        for combo in itertools.product(*[[(e["key"], v) for v in e["values"]] for e in exprs]):
            terms.append(tuple(sorted(combo)))
    return terms


def accessibility_requirements(driver: str, nodes: Sequence[Mapping[str, Any]],
                               csinodes: Sequence[Mapping[str, Any]], selected_node: str,
                               allowed_topologies: Sequence[Mapping[str, Any]] = ()
                               ) -> csi_pb2.TopologyRequirement:
    by_name = {c["metadata"]["name"]: c for c in csinodes}
    if selected_node not in by_name:
        raise ProvisioningError(f"no CSINode for {selected_node}")
    keys = topology_keys(by_name[selected_node], driver)
    if not keys:
        raise ProvisioningError(f"no topology key found for node {selected_node}")
    node = next(n for n in nodes if n["metadata"]["name"] == selected_node)
    selected = _node_term(node, keys)
    if selected is None:
        raise ProvisioningError(f"topology labels of {selected_node} miss keys {keys}")
    if allowed_topologies:
        requisite = _flatten(allowed_topologies)
    else:
        requisite = [t for t in (_node_term(n, keys) for n in nodes) if t is not None]
    requisite = sorted(set(requisite), key=_term_key)
    first = next((i for i, t in enumerate(requisite) if _subset(t, selected)), None)
    if first is None:
        raise ProvisioningError(f"topology {selected} of {selected_node} is not in requisite")
    preferred = requisite[first:] + requisite[:first]

    def proto(terms: list[Term]) -> list[csi_pb2.Topology]:
        return [csi_pb2.Topology(segments=dict(t)) for t in terms if t]
    return csi_pb2.TopologyRequirement(requisite=proto(requisite), preferred=proto(preferred))


def node_affinity(topologies: Sequence[csi_pb2.Topology]) -> list[list[tuple[str, str]]]:
    """The PV's required node selector terms: a list (OR) of (key, value) lists (AND)."""
    return [sorted(t.segments.items()) for t in topologies]


def node_matches(node: Mapping[str, Any], affinity: list[list[tuple[str, str]]]) -> bool:
    labels = node["metadata"].get("labels") or {}
    return not affinity or any(all(labels.get(k) == v for k, v in term) for term in affinity)


def capacity_segments(driver: str, nodes: Sequence[Mapping[str, Any]],
                      csinodes: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The distinct topology segments of the nodes running the driver (what capacity
    tracking asks GetCapacity for)."""
    segments = set()
    by_name = {c["metadata"]["name"]: c for c in csinodes}
    for node in nodes:
        keys = topology_keys(by_name.get(node["metadata"]["name"], {"spec": {"drivers": []}}),
                             driver)
        term = _node_term(node, keys) if keys else None
        if term:
            segments.add(term)
    return [dict(t) for t in sorted(segments, key=_term_key)]


# -- the requests ---------------------------------------------------------------------------------
def create_volume_request(*, driver: str, pvc: Mapping[str, Any], sc: Mapping[str, Any],
                          nodes: Sequence[Mapping[str, Any]],
                          csinodes: Sequence[Mapping[str, Any]],
                          secrets: Sequence[Mapping[str, Any]] = (),
                          vac: Mapping[str, Any] | None = None,
                          source: csi_pb2.VolumeContentSource | None = None,
                          default_fstype: str = "ext4", extra_metadata: bool = True
                          ) -> csi_pb2.CreateVolumeRequest:
    meta, spec = pvc["metadata"], pvc["spec"]
    pv_name = f"pvc-{meta['uid']}"
    params = dict(sc.get("parameters") or {})
    block = spec.get("volumeMode") == "Block"
    fs_type = fs_type_of(sc, default_fstype)
    caps = [capability(block, [m], fs_type, sc.get("mountOptions") or ())
            for m in spec["accessModes"]]
    selected = (meta.get("annotations") or {}).get("volume.kubernetes.io/selected-node", "")
    req = csi_pb2.CreateVolumeRequest(
        name=pv_name,
        volume_capabilities=caps,
        capacity_range=csi_pb2.CapacityRange(
            required_bytes=parse_quantity(spec["resources"]["requests"]["storage"])),
        accessibility_requirements=accessibility_requirements(
            driver, nodes, csinodes, selected, sc.get("allowedTopologies") or ()),
        secrets=secret_data(secrets, secret_reference(params, *PROVISIONER_SECRET_KEYS,
                                                      pv_name, pvc)),
    )
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    stripped = remove_prefixed(params, _PROVISIONER_KNOWN)
    if extra_metadata:
        stripped.update({PREFIX + "pvc/name": meta["name"],
                         PREFIX + "pvc/namespace": meta["namespace"],
                         PREFIX + "pv/name": pv_name})
    req.parameters.update(stripped)
    if vac is not None:
        if vac["driverName"] != driver:
            raise ProvisioningError("the VolumeAttributesClass is another driver's")
        req.mutable_parameters.update(vac.get("parameters") or {})
    return req


def persistent_volume(req: csi_pb2.CreateVolumeRequest, rsp: csi_pb2.CreateVolumeResponse,
                      pvc: Mapping[str, Any], sc: Mapping[str, Any], driver: str,
                      default_fstype: str = "ext4") -> dict:
    """The PV the provisioner writes for a created volume."""
    block = pvc["spec"].get("volumeMode") == "Block"
    return {
        "metadata": {"name": req.name},
        "spec": {
            "accessModes": list(pvc["spec"]["accessModes"]),
            "capacity": {"storage": str(rsp.volume.capacity_bytes)},
            "volumeMode": "Block" if block else "Filesystem",
            "mountOptions": list(sc.get("mountOptions") or ()),
            "csi": {"driver": driver, "volumeHandle": rsp.volume.volume_id,
                    "fsType": "" if block else fs_type_of(sc, default_fstype),
                    "volumeAttributes": dict(rsp.volume.volume_context), "readOnly": False},
            "nodeAffinity": node_affinity(rsp.volume.accessible_topology),
        },
    }


def pv_capability(pv: Mapping[str, Any]) -> csi_pb2.VolumeCapability:
    spec = pv["spec"]
    return capability(spec["volumeMode"] == "Block", spec["accessModes"], spec["csi"]["fsType"],
                      spec.get("mountOptions") or ())


def capacity_request(sc: Mapping[str, Any], segment: Mapping[str, str]
                     ) -> csi_pb2.GetCapacityRequest:
    return csi_pb2.GetCapacityRequest(parameters=dict(sc.get("parameters") or {}),
                                      accessible_topology=csi_pb2.Topology(segments=segment))


def controller_publish_request(pv: Mapping[str, Any], node_id: str
                               ) -> csi_pb2.ControllerPublishVolumeRequest:
    csi = pv["spec"]["csi"]
    return csi_pb2.ControllerPublishVolumeRequest(
        volume_id=csi["volumeHandle"], node_id=node_id, volume_capability=pv_capability(pv),
        readonly=csi["readOnly"], volume_context=csi["volumeAttributes"])


def staging_path(kubelet_root: str, driver: str, pv: Mapping[str, Any]) -> str:
    if pv["spec"]["volumeMode"] == "Block":
        return f"{kubelet_root}/plugins/kubernetes.io/csi/volumeDevices/staging/" \
               f"{pv['metadata']['name']}"
    digest = hashlib.sha256(pv["spec"]["csi"]["volumeHandle"].encode()).hexdigest()
    return f"{kubelet_root}/plugins/kubernetes.io/csi/{driver}/{digest}/globalmount"


def target_path(kubelet_root: str, pv: Mapping[str, Any], pod: Mapping[str, Any]) -> str:
    uid, name = pod["metadata"]["uid"], pv["metadata"]["name"]
    if pv["spec"]["volumeMode"] == "Block":
        return f"{kubelet_root}/plugins/kubernetes.io/csi/volumeDevices/publish/{name}/{uid}"
    return f"{kubelet_root}/pods/{uid}/volumes/kubernetes.io~csi/{name}/mount"


def node_stage_request(pv: Mapping[str, Any], staging: str, publish_context: Mapping[str, str]
                       ) -> csi_pb2.NodeStageVolumeRequest:
    csi = pv["spec"]["csi"]
    return csi_pb2.NodeStageVolumeRequest(
        volume_id=csi["volumeHandle"], staging_target_path=staging,
        volume_capability=pv_capability(pv), publish_context=publish_context,
        volume_context=csi["volumeAttributes"])


def pod_info(pod: Mapping[str, Any]) -> dict[str, str]:
    """What podInfoOnMount adds to NodePublish's volume_context."""
    meta = pod["metadata"]
    return {PREFIX + "pod.name": meta["name"], PREFIX + "pod.namespace": meta["namespace"],
            PREFIX + "pod.uid": meta["uid"],
            PREFIX + "serviceAccount.name": pod["spec"].get("serviceAccountName", "default"),
            PREFIX + "ephemeral": "false"}


def node_publish_request(pv: Mapping[str, Any], staging: str, target: str,
                         publish_context: Mapping[str, str], pod: Mapping[str, Any]
                         ) -> csi_pb2.NodePublishVolumeRequest:
    csi = pv["spec"]["csi"]
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=csi["volumeHandle"], staging_target_path=staging, target_path=target,
        volume_capability=pv_capability(pv), readonly=csi["readOnly"],
        publish_context=publish_context,
        volume_context={**csi["volumeAttributes"], **pod_info(pod)})


def create_snapshot_request(vsc: Mapping[str, Any], snapshot: Mapping[str, Any],
                            pv: Mapping[str, Any], content_name: str,
                            secrets: Sequence[Mapping[str, Any]] = (),
                            extra_metadata: bool = True) -> csi_pb2.CreateSnapshotRequest:
    params = dict(vsc.get("parameters") or {})
    stripped = remove_prefixed(params, _SNAPSHOTTER_KNOWN)
    meta = snapshot["metadata"]
    if extra_metadata:
        stripped.update({PREFIX + "volumesnapshot/name": meta["name"],
                         PREFIX + "volumesnapshot/namespace": meta["namespace"],
                         PREFIX + "volumesnapshotcontent/name": content_name})
    ref = None
    if PREFIX + "snapshotter-secret-name" in params:
        ref = (params[PREFIX + "snapshotter-secret-namespace"],
               params[PREFIX + "snapshotter-secret-name"])
    return csi_pb2.CreateSnapshotRequest(
        name=f"snapshot-{meta['uid']}", source_volume_id=pv["spec"]["csi"]["volumeHandle"],
        parameters=stripped, secrets=secret_data(secrets, ref))


def controller_expand_request(pv: Mapping[str, Any], new_bytes: int
                              ) -> csi_pb2.ControllerExpandVolumeRequest:
    return csi_pb2.ControllerExpandVolumeRequest(
        volume_id=pv["spec"]["csi"]["volumeHandle"],
        capacity_range=csi_pb2.CapacityRange(required_bytes=new_bytes),
        volume_capability=pv_capability(pv))


def node_expand_request(pv: Mapping[str, Any], target: str, staging: str, new_bytes: int
                        ) -> csi_pb2.NodeExpandVolumeRequest:
    return csi_pb2.NodeExpandVolumeRequest(
        volume_id=pv["spec"]["csi"]["volumeHandle"], volume_path=target,
        staging_target_path=staging,
        capacity_range=csi_pb2.CapacityRange(required_bytes=new_bytes),
        volume_capability=pv_capability(pv))


def modify_volume_request(pv: Mapping[str, Any], vac: Mapping[str, Any]
                          ) -> csi_pb2.ControllerModifyVolumeRequest:
    return csi_pb2.ControllerModifyVolumeRequest(
        volume_id=pv["spec"]["csi"]["volumeHandle"],
        mutable_parameters=dict(vac.get("parameters") or {}))


_UNITS = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
          "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}


def parse_quantity(text: str) -> int:
    """A Kubernetes storage quantity in bytes ("256Mi", "1G", "1048576")."""
    m = re.fullmatch(r"(\d+)([kMGT]i?|)", text)
    if not m:
        raise ProvisioningError(f"quantity {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]
