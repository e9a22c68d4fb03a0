"""The manifests in deploy/ are valid Kubernetes 1.34 objects and agree with the driver and
with each other: names, parameters, tiers, flags, secrets, ports and sidecar versions.

Validation is offline: kubernetes-validate ships Kubernetes' JSON schemas (1.34 included)
inside its wheel; the custom resources (snapshot classes, SnapshotMetadataService) are
checked against schemas written from their CRDs (tests/unit/crd_schemas.py).
"""

from __future__ import annotations

import copy
import functools
import glob
import json
import os
import re
import shlex
from importlib import resources

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

from control import mirrored
from control.ha.main import parse_args as parse_ha_args
from csi import validation
from csi.config import DRIVER_NAME
from csi.server import parse_args
from engine.errors import InvalidSpec
from engine.qos.tiers import DEFAULT_TIERS, resolve_qos
from tests.unit.crd_schemas import BASE_ID, CRD_SCHEMAS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KUBERNETES = "1.34.0"  # the oldest supported release (docs/cluster.md)
NAMESPACE = "tandem-system"


# Sidecar images: csi-driver-host-path's deploy/kubernetes-1.34 pins the same versions.
SIDECARS = {
    "csi-provisioner": "v6.3.0",
    "csi-attacher": "v4.12.0",
    "csi-resizer": "v2.2.1",
    "csi-snapshotter": "v8.6.0",
    "csi-snapshot-metadata": "v0.2.0",
    "csi-node-driver-registrar": "v2.17.0",
    "livenessprobe": "v2.19.0",
}


# -- reading the manifests ---------------------------------------------------------------------
def manifest_files() -> list[str]:
    return sorted(glob.glob(os.path.join(REPO, "deploy", "*.yaml"))
                  + glob.glob(os.path.join(REPO, "deploy", "examples", "*.yaml")))


@functools.cache
def _read_all() -> tuple[tuple[str, dict], ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    found = []
    for path in manifest_files():
        with open(path) as f:
            found += [(os.path.relpath(path, REPO), d) for d in yaml.load_all(f, loader) if d]
    return tuple(found)


def all_objects() -> list[tuple[str, dict]]:
    """(file, object) of every manifest: fresh copies, so no test sees another's edits."""
    return copy.deepcopy(list(_read_all()))


def objects(kind: str) -> list[dict]:
    return [d for _, d in all_objects() if d.get("kind") == kind]


def workload(name: str) -> dict:
    (found,) = [d for _, d in all_objects()
                if d["kind"] in ("Deployment", "DaemonSet") and d["metadata"]["name"] == name]
    return found


def container(obj: dict, name: str) -> dict:
    (found,) = [c for c in obj["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def flag(args: list[str], name: str) -> str | None:
    for a in args:
        if a == name:
            return ""
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    return None


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """$(VAR) references as the kubelet expands them."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


# -- schema validation -------------------------------------------------------------------------
def _definitions() -> referencing.Registry:
    path = resources.files("kubernetes_validate").joinpath(
        "kubernetes-json-schema", f"v{KUBERNETES}-local-strict", "_definitions.json")
    defs = json.loads(path.read_text())
    return referencing.Resource.from_contents(defs) @ referencing.Registry()


def validate(obj: dict) -> None:
    """Raises if obj is not a valid Kubernetes 1.34 object (strict: unknown fields fail)."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_SCHEMAS:
        schema = {**CRD_SCHEMAS[key], "$id": BASE_ID}
        jsonschema.Draft202012Validator(schema, registry=_definitions()).validate(obj)
        return
    kubernetes_validate.validate(obj, KUBERNETES, strict=True)


@pytest.mark.parametrize("where,obj", all_objects(),
                         ids=lambda v: v if isinstance(v, str) else
                         f"{v['kind']}/{v['metadata']['name']}")
def test_every_object_validates_against_kubernetes_1_34(where, obj):
    validate(obj)


def test_the_validation_catches_mistakes():
    """A typo in a built-in object, a bad enum in a custom one, and a misplaced field in
    metadata all fail: strict schemas, not a check that passes anything."""
    (ds,) = objects("DaemonSet")
    bad = copy.deepcopy(ds)
    bad["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)
    vsc = objects("VolumeSnapshotClass")[0]
    for change in ({"deletionPolicy": "Keep"}, {"parameter": {}},
                   {"metadata": {"name": "x", "label": {}}}):
        with pytest.raises(jsonschema.ValidationError):
            validate({**vsc, **change})
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClas",
                  "metadata": {"name": "x"}})


def test_every_kind_has_a_schema_here():
    """Every custom resource deploy/ uses has a schema in crd_schemas.py; everything else
    is a built-in kind of Kubernetes 1.34."""
    builtin = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
               "RoleBinding", "Deployment", "DaemonSet", "Service", "Secret", "CSIDriver",
               "StorageClass", "VolumeAttributesClass", "ConfigMap"}
    for _, obj in all_objects():
        assert obj["kind"] in builtin or (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS


# -- the driver object and the classes ---------------------------------------------------------
def test_csidriver_matches_the_attach_model():
    (driver,) = objects("CSIDriver")
    assert driver["metadata"]["name"] == DRIVER_NAME
    spec = driver["spec"]
    assert spec["attachRequired"] is True  # ControllerPublish fences (external-attacher)
    assert spec["podInfoOnMount"] is True  # tiers need the pod UID at publish
    assert spec["storageCapacity"] is True  # GetCapacity per zone steers scheduling
    assert spec["volumeLifecycleModes"] == ["Persistent"]


def test_storage_classes_cover_every_tier_with_one_and_three_replicas():
    everything = objects("StorageClass")
    # the loop-backend classes; NVMe nodes have their own (storageclasses-nvme.yaml)
    # (and not the classes of restores from backups, which name the provisioner's secret)
    classes = [sc for sc in everything if "-nvme-" not in sc["metadata"]["name"]
               and "csi.storage.k8s.io/provisioner-secret-name" not in sc["parameters"]]
    seen = set()
    for sc in classes:
        assert sc["provisioner"] == DRIVER_NAME
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
        params = sc["parameters"]
        replicas = params.get("replicas", "1")
        assert replicas in ("1", "2", "3")
        seen.add((params["tier"], replicas))
        assert sc["metadata"]["name"] == f"tandem-{params['tier']}" + (
            "" if replicas == "1" else f"-r{replicas}")
    assert seen == {(t, r) for t in DEFAULT_TIERS for r in ("1", "3")}
    defaults = [sc for sc in everything if sc["metadata"].get("annotations", {}).get(
        "storageclass.kubernetes.io/is-default-class") == "true"]
    assert len(defaults) == 1


def _known_parameters(sc: dict) -> dict:
    return validation.check_parameters(sc["parameters"], validation.VOLUME_PARAMETER_KEYS,
                                       "parameter")


def test_storage_class_tiers_and_attribute_classes_resolve():
    for sc in objects("StorageClass"):
        assert resolve_qos(_known_parameters(sc)).name in DEFAULT_TIERS
    for vac in objects("VolumeAttributesClass"):
        assert vac["apiVersion"] == "storage.k8s.io/v1"  # GA in 1.34
        assert vac["driverName"] == DRIVER_NAME
        params = validation.check_parameters(vac["parameters"],
                                             validation.MUTABLE_PARAMETER_KEYS, "parameter")
        assert resolve_qos({}, params).name in DEFAULT_TIERS


def test_the_driver_accepts_every_storage_class_parameter():
    """Every parameter is the driver's, with a value it takes (mirrored ones included)."""
    for sc in objects("StorageClass"):
        params = _known_parameters(sc)
        mirrored.parse_parameters(params)


# -- tandem-csi's flags ------------------------------------------------------------------------
def tandem_args(name: str) -> list[str]:
    c = container(workload(name), "tandem")
    env = {e["name"]: f"<{e['name']}>" for e in c.get("env", [])}
    env.update({"NODE_NAME": "node-1", "NODE_IP": "198.18.0.1",
                "TANDEM_STORE": "etcds://198.18.0.1:2379"})
    return expand(c["args"], env)


def parsed(args: list[str]):
    """tandem-csi's configuration from these args (every flag must parse)."""
    return parse_args(args)


@pytest.mark.parametrize("name", ["tandem-controller", "tandem-node"])
def test_tandem_flags_parse(name):
    args = tandem_args(name)
    config = parsed(args)
    assert config.endpoint == "unix:///csi/csi.sock"
    assert config.store_url == "etcds://198.18.0.1:2379"
    assert (config.store_ca_file, config.store_cert_file, config.store_key_file) == (
        "/etc/tandem/etcd/ca.crt", "/etc/tandem/etcd/tls.crt", "/etc/tandem/etcd/tls.key")
    assert flag(args, "--mode") == {"tandem-controller": "controller",
                                    "tandem-node": "node"}[name]
    assert flag(args, "--zone") is None  # cluster mode reads the node's zone label


def test_env_references_are_defined():
    """Every $(VAR) in a container's args is in its env (else the kubelet passes the
    text through unexpanded)."""
    for _, obj in all_objects():
        if obj["kind"] not in ("Deployment", "DaemonSet"):
            continue
        for c in obj["spec"]["template"]["spec"]["containers"]:
            defined = {e["name"] for e in c.get("env", [])}
            for arg in c.get("args", []):
                for var in re.findall(r"\$\((\w+)\)", arg):
                    assert var in defined, (obj["metadata"]["name"], c["name"], arg)


def test_the_node_plugin_keeps_paths_in_the_kubelets_directory():
    """--allowed-path-root is the kubelet's directory, which the container mounts: the
    kubelet's staging and target paths pass, anything else is refused."""
    ds = workload("tandem-node")
    c = container(ds, "tandem")
    config = parsed(tandem_args("tandem-node"))
    assert config.allowed_path_roots == ("/var/lib/kubelet",)
    mounted = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounted["/var/lib/kubelet"]["mountPropagation"] == "Bidirectional"
    policy = validation.PathPolicy.of(config.allowed_path_roots,
                                      (config.state_dir, config.pool_directory,
                                       config.socket_path))
    kubelet = "/var/lib/kubelet"
    for path in [f"{kubelet}/plugins/kubernetes.io/csi/tandem.csi.dev/abc/globalmount",
                 f"{kubelet}/pods/uid/volumes/kubernetes.io~csi/pvc-1/mount",
                 f"{kubelet}/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-1/uid"]:
        assert validation.check_path(path, "p", policy) == path
    for path in ["/etc/x", "/var/lib/tandem/pool/x", "/tmp/x", "/var/lib"]:
        with pytest.raises(InvalidSpec):
            validation.check_path(path, "p", policy)


def test_the_node_plugin_registers_its_socket_and_serves_the_agent_port():
    ds = workload("tandem-node")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    registrar = container(ds, "node-driver-registrar")
    socket_dir = next(v for v in spec["volumes"] if v["name"] == "socket-dir")
    host_dir = socket_dir["hostPath"]["path"]
    assert flag(registrar["args"], "--kubelet-registration-path") == f"{host_dir}/csi.sock"
    assert host_dir == f"/var/lib/kubelet/plugins/{DRIVER_NAME}"
    tandem = container(ds, "tandem")
    listen = flag(tandem_args("tandem-node"), "--agent-listen")
    ports = {p["name"]: p["containerPort"] for p in tandem["ports"]}
    assert listen == f"198.18.0.1:{ports['agent']}"


def test_probes_point_at_the_liveness_sidecar():
    for name in ("tandem-controller", "tandem-node"):
        obj = workload(name)
        probe = container(obj, "liveness-probe")
        port = int(flag(probe["args"], "--http-endpoint").lstrip(":"))
        tandem = container(obj, "tandem")
        ports = {p["name"]: p["containerPort"] for p in tandem["ports"]}
        assert tandem["livenessProbe"]["httpGet"]["port"] == "healthz"
        assert ports["healthz"] == port


# -- secrets, mounts and the files the flags name ------------------------------------------
def secrets() -> dict[str, dict]:
    return {s["metadata"]["name"]: s for s in objects("Secret")}


def test_every_secret_used_exists_with_the_keys_used():
    known = secrets()
    for _, obj in all_objects():
        if obj["kind"] not in ("Deployment", "DaemonSet"):
            continue
        pod = obj["spec"]["template"]["spec"]
        for vol in pod.get("volumes", []):
            if "secret" in vol:
                secret = known[vol["secret"]["secretName"]]
                assert secret["metadata"]["namespace"] == obj["metadata"]["namespace"]
                for item in vol["secret"].get("items", []):
                    assert item["key"] in secret["stringData"]
        for c in pod["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in known[ref["name"]]["stringData"]


def _mounted_file(obj: dict, container_name: str, path: str) -> tuple[str, str]:
    """(secret name, key) of the file at path in a container, through its mounts."""
    pod = obj["spec"]["template"]["spec"]
    c = container(obj, container_name)
    for m in c["volumeMounts"]:
        prefix = m["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            vol = next(v for v in pod["volumes"] if v["name"] == m["name"])
            assert "secret" in vol, f"{path} is not from a Secret"
            rel = path[len(prefix):]
            items = vol["secret"].get("items")
            key = next(i["key"] for i in items if i["path"] == rel) if items else rel
            return vol["secret"]["secretName"], key
    raise AssertionError(f"{path} is not mounted in {container_name}")


def test_tls_flags_name_files_the_secrets_provide():
    known = secrets()
    cases = [("tandem-controller", "tandem", "--store-ca", "tandem-etcd"),
             ("tandem-controller", "tandem", "--agent-cert", "tandem-agent-tls"),
             ("tandem-node", "tandem", "--store-key", "tandem-etcd"),
             ("tandem-node", "tandem", "--agent-key", "tandem-agent-tls"),
             ("tandem-node", "tandem", "--agent-ca", "tandem-agent-tls"),
             ("tandem-ha", "tandem-ha", "--store-cert", "tandem-etcd"),
             ("tandem-controller", "csi-snapshot-metadata", "--tls-cert",
              "tandem-snapshot-metadata-tls"),
             ("tandem-controller", "csi-snapshot-metadata", "--tls-key",
              "tandem-snapshot-metadata-tls")]
    for name, cname, option, secret_name in cases:
        obj = workload(name)
        path = flag(container(obj, cname)["args"], option)
        secret, key = _mounted_file(obj, cname, path)
        assert secret == secret_name and key in known[secret]["stringData"], (name, option)


# -- the sidecars ----------------------------------------------------------------------------
def images() -> dict[str, str]:
    found = {}
    for _, obj in all_objects():
        if obj["kind"] in ("Deployment", "DaemonSet"):
            for c in obj["spec"]["template"]["spec"]["containers"]:
                repo, _, tag = c["image"].rpartition(":")
                found[repo.rsplit("/", 1)[-1]] = tag
    return found


def test_sidecar_versions_are_pinned_and_match_kubernetes_1_34():
    found = images()
    for name, tag in SIDECARS.items():
        assert found[name] == tag, name
    assert int(found["csi-provisioner"][1:].split(".")[0]) >= 6
    assert int(found["csi-resizer"][1:].split(".")[0]) >= 2
    assert all(re.fullmatch(r"v?\d+\.\d+\.\d+", t) for t in found.values())  # no :latest


def test_no_feature_gate_the_sidecars_no_longer_have():
    """Topology and VolumeAttributesClass are GA in provisioner v6 / resizer v2: pass no
    gate (a removed one stops the sidecar)."""
    dep = workload("tandem-controller")
    for name in ("csi-provisioner", "csi-resizer", "csi-attacher"):
        assert flag(container(dep, name)["args"], "--feature-gates") is None, name


def test_the_controller_runs_centralized_with_capacity_tracking():
    dep = workload("tandem-controller")
    assert dep["spec"]["replicas"] == 2
    prov = container(dep, "csi-provisioner")
    args = prov["args"]
    assert flag(args, "--enable-capacity") == ""
    assert flag(args, "--capacity-ownerref-level") == "2"  # pod -> ReplicaSet -> Deployment
    assert flag(args, "--strict-topology") == "false"
    assert flag(args, "--extra-create-metadata") == ""
    assert flag(args, "--node-deployment") is None
    assert {e["name"] for e in prov["env"]} >= {"NAMESPACE", "POD_NAME"}
    for name in ("csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter"):
        assert flag(container(dep, name)["args"], "--leader-election") == "", name
    # the node plugin runs no controller-side sidecar any more
    node_containers = {c["name"] for c in
                       workload("tandem-node")["spec"]["template"]["spec"]["containers"]}
    assert node_containers == {"tandem", "node-driver-registrar", "liveness-probe"}


def test_snapshot_metadata_port_service_audience_and_certificate_agree():
    dep = workload("tandem-controller")
    sidecar = container(dep, "csi-snapshot-metadata")
    (service,) = [s for s in objects("Service")
                  if s["metadata"]["name"] == "tandem-snapshot-metadata"]
    (sms,) = objects("SnapshotMetadataService")
    assert sms["metadata"]["name"] == DRIVER_NAME
    host, port = sms["spec"]["address"].rsplit(":", 1)
    assert host == f"{service['metadata']['name']}.{service['metadata']['namespace']}"
    (svc_port,) = service["spec"]["ports"]
    assert int(port) == svc_port["port"]
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports[svc_port["targetPort"]] == int(flag(sidecar["args"], "--port"))
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert flag(sidecar["args"], "--audience") == sms["spec"]["audience"]
    assert secrets()["tandem-snapshot-metadata-tls"]["type"] == "kubernetes.io/tls"


# -- the HA controller -------------------------------------------------------------------------
def test_the_ha_controller_deployment_runs_tandem_ha():
    dep = workload("tandem-ha")
    assert dep["spec"]["replicas"] == 2
    c = container(dep, "tandem-ha")
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        assert re.search(r'^tandem-ha = "control\.ha\.main:main"$', f.read(), re.M)
    with open(os.path.join(REPO, "deploy", "Dockerfile")) as f:
        venv = re.search(r"python3 -m venv (\S+)", f.read()).group(1)
    assert c["command"] == [f"{venv}/bin/tandem-ha"]
    args = parse_ha_args(expand(c["args"], {"TANDEM_STORE": "etcds://198.18.0.1:2379",
                                            "POD_NAME": "tandem-ha-0"}))
    assert args.store_ca == "/etc/tandem/etcd/ca.crt" and args.id == "tandem-ha-0"


def _rules(name: str) -> list[dict]:
    (role,) = [r for r in objects("ClusterRole") if r["metadata"]["name"] == name]
    return role["rules"]


def _allows(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
               for r in rules)


def test_rbac_grants_what_the_ha_controller_calls():
    """control/ha/kube.py lists nodes, pods, claims, volumes and attachments, deletes pods and
    attachments: exactly what its ClusterRole allows (nothing that writes elsewhere)."""
    rules = _rules("tandem-ha")
    for group, resource in [("", "nodes"), ("", "pods"), ("", "persistentvolumeclaims"),
                            ("", "persistentvolumes"), ("storage.k8s.io", "volumeattachments")]:
        assert _allows(rules, group, resource, "list"), resource
    assert _allows(rules, "", "pods", "delete")
    assert _allows(rules, "storage.k8s.io", "volumeattachments", "delete")
    writes = {v for r in rules for v in r["verbs"]} - {"get", "list", "watch", "delete"}
    assert not writes


def test_the_node_plugin_may_read_its_node_and_nothing_more():
    """csi/zone.py reads the Node's zone label (read_node) with the node's own account;
    the binding must reach that account and grant get on nodes, and no write."""
    sa = workload("tandem-node")["spec"]["template"]["spec"]["serviceAccountName"]
    roles = [b["roleRef"]["name"] for b in objects("ClusterRoleBinding")
             if any(s["name"] == sa for s in b["subjects"])]
    rules = [rule for name in roles for rule in _rules(name)]
    assert _allows(rules, "", "nodes", "get")
    with open(os.path.join(REPO, "csi", "zone.py")) as f:
        assert "read_node(" in f.read()
    assert {v for r in rules for v in r["verbs"]} <= {"get", "list", "watch"}


def test_service_accounts_are_bound():
    accounts = {(s["metadata"]["namespace"], s["metadata"]["name"])
                for s in objects("ServiceAccount")}
    for name in ("tandem-controller", "tandem-node", "tandem-ha"):
        sa = workload(name)["spec"]["template"]["spec"]["serviceAccountName"]
        assert (NAMESPACE, sa) in accounts
        bound = [b for b in objects("ClusterRoleBinding")
                 if any(s["name"] == sa for s in b["subjects"])]
        assert bound, sa
    assert _allows(_rules("tandem-controller"), "storage.k8s.io", "volumeattachments", "patch")


def test_no_manifest_shells_out():
    """Args are argument lists (no `sh -c`), so $(VAR) expansion is the kubelet's only."""
    for _, obj in all_objects():
        if obj["kind"] in ("Deployment", "DaemonSet"):
            for c in obj["spec"]["template"]["spec"]["containers"]:
                assert "sh" not in [shlex.split(x)[0] for x in c.get("command", [])[:1]]
def test_nvme_storage_classes_offer_no_expansion_and_nvme_flags_parse():
    nvme_classes = [sc for sc in objects("StorageClass") if "nvme" in sc["metadata"]["name"]]
    assert nvme_classes
    for sc in nvme_classes:
        assert sc["allowVolumeExpansion"] is False
    config = parse_args(["--backend=nvme", "--nvme-subsystem=nqn.2014-08.org.example:ssd0",
                         "--nvme-namespaces=pool", "--nvme-pool-nsids=1-8",
                         "--nvme-measure-nsid=9"])
    assert config.backend == "nvme" and config.overcommit_ratio == 1.0
    assert config.nvme is not None and config.nvme.pool_nsids == tuple(range(1, 9))
    with pytest.raises(SystemExit):
        parse_args(["--backend=nvme", "--nvme-subsystem=nqn.x", "--overcommit-ratio=20"])
def test_backup_classes_and_targets_agree_with_the_driver(tmp_path):
    from csi.snapshotter import BACKUP_TARGET, SNAPSHOT_PARAMETERS
    from engine.backup.targets import Targets

    (config_map,) = [c for c in objects("ConfigMap")
                     if c["metadata"]["name"] == "tandem-backup-targets"]
    path = tmp_path / "targets.json"
    path.write_text(config_map["data"]["targets.json"])
    targets = Targets.load(str(path))
    secrets = {s["metadata"]["name"]: s for s in objects("Secret")}
    for vsc in objects("VolumeSnapshotClass"):
        params = validation.check_parameters(vsc.get("parameters", {}), SNAPSHOT_PARAMETERS,
                                             "snapshot parameter")
        if BACKUP_TARGET in params:
            targets.require(params[BACKUP_TARGET])
            secret = vsc["parameters"]["csi.storage.k8s.io/snapshotter-secret-name"]
            assert set(secrets[secret]["stringData"]) >= {"accessKeyId", "secretAccessKey",
                                                          "encryptionKey"}
    for name in ("tandem-node", "tandem-controller"):  # uploads / restores, ListSnapshots
        (tandem,) = [c for c in workload(name)["spec"]["template"]["spec"]["containers"]
                     if c["name"] == "tandem"]
        flag_ = [a for a in tandem["args"] if a.startswith("--backup-targets=")]
        mounts = {m["name"]: m["mountPath"] for m in tandem["volumeMounts"]}
        assert flag_ == [f"--backup-targets={mounts['backup-targets']}/targets.json"], name
    (binding,) = [b for b in objects("RoleBinding")
                  if b["metadata"]["name"] == "tandem-backup-secrets"]
    assert [s["name"] for s in binding["subjects"]] == [
        workload("tandem-controller")["spec"]["template"]["spec"]["serviceAccountName"]]
