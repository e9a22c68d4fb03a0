"""The manifests in deploy/ agree with the driver: names, parameters, tiers and flags."""

import glob
import os

import pytest
import yaml

from csi import validation
from csi.config import DRIVER_NAME
from csi.server import parse_args
from engine.errors import InvalidSpec
from engine.qos.tiers import DEFAULT_TIERS, resolve_qos

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def objects(kind: str) -> list[dict]:
    found = []
    for path in sorted(glob.glob(os.path.join(REPO, "deploy", "*.yaml"))):
        with open(path) as f:
            found += [d for d in yaml.safe_load_all(f) if d and d.get("kind") == kind]
    return found


def test_csidriver():
    (driver,) = objects("CSIDriver")
    assert driver["metadata"]["name"] == DRIVER_NAME
    assert driver["spec"]["podInfoOnMount"] is True  # tiers need the pod UID at publish
    assert driver["spec"]["storageCapacity"] is True  # GetCapacity per tier steers scheduling


def test_storage_classes_and_attribute_classes_use_known_parameters():
    for sc in objects("StorageClass"):
        assert sc["provisioner"] == DRIVER_NAME
        params = validation.check_parameters(sc["parameters"], validation.VOLUME_PARAMETER_KEYS,
                                             "parameter")
        assert resolve_qos(params).name in DEFAULT_TIERS
    for vac in objects("VolumeAttributesClass"):
        assert vac["driverName"] == DRIVER_NAME
        params = validation.check_parameters(vac["parameters"],
                                             validation.MUTABLE_PARAMETER_KEYS, "parameter")
        assert resolve_qos({}, params).name in DEFAULT_TIERS


def test_the_node_daemonset_flags_parse():
    (ds,) = objects("DaemonSet")
    (container,) = [c for c in ds["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "tandem"]
    args = [a.replace("$(NODE_NAME)", "node-1").replace("$(NODE_ZONE)", "zone-1")
            for a in container["args"]]
    config = parse_args(args)
    assert config.endpoint == "unix:///csi/csi.sock"
    assert config.node_id == "node-1" and config.zone == "zone-1"


def test_the_node_daemonset_keeps_paths_in_the_kubelets_directory():
    """--allowed-path-root is the kubelet's directory, which the container mounts: the
    kubelet's staging and target paths pass, anything else is refused."""
    (ds,) = objects("DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "tandem"]
    config = parse_args([a.replace("$(NODE_NAME)", "n").replace("$(NODE_ZONE)", "z")
                         for a in container["args"]])
    assert config.allowed_path_roots == ("/var/lib/kubelet",)
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/var/lib/kubelet" in mounted
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


def test_backup_classes_and_targets_agree_with_the_driver(tmp_path):
    from backup.targets import Targets
    from csi.snapshotter import BACKUP_TARGET, SNAPSHOT_PARAMETERS

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
    (ds,) = objects("DaemonSet")
    (container,) = [c for c in ds["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "tandem"]
    flag = [a for a in container["args"] if a.startswith("--backup-targets=")]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert flag == [f"--backup-targets={mounts['backup-targets']}/targets.json"]
