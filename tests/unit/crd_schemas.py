"""JSON schemas of the custom resources deploy/ uses, for validating them offline.

kubernetes-validate ships Kubernetes' own schemas, not those of CRDs. These are written
here from the CRDs' openAPIV3Schema (descriptions and CEL immutability rules left out,
unknown fields refused as `kubectl apply`'s strict field validation does):

- snapshot.storage.k8s.io/v1 VolumeSnapshotClass and groupsnapshot.storage.k8s.io/v1
  VolumeGroupSnapshotClass: external-snapshotter v8.6.0, client/config/crd/;
- cbt.storage.k8s.io/v1alpha1 SnapshotMetadataService: external-snapshot-metadata v0.2.0,
  client/config/crd/ (v1.0.0 replaced v1alpha1 by v1beta1 with the same spec).

metadata is checked against Kubernetes' ObjectMeta from kubernetes-validate's definitions.
"""

from __future__ import annotations

# resolved through kubernetes-validate's _definitions.json (its $id is under this base)
BASE_ID = "https://kubernetes.io/api/tandem-crds.json"
OBJECT_META = "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"

_CLASS = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "driver", "deletionPolicy"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"$ref": OBJECT_META},
        "driver": {"type": "string", "minLength": 1},
        "deletionPolicy": {"type": "string", "enum": ["Delete", "Retain"]},
        "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

_SNAPSHOT_METADATA_SERVICE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"$ref": OBJECT_META},
        "spec": {
            "type": "object",
            "required": ["address", "audience", "caCert"],
            "additionalProperties": False,
            "properties": {
                "address": {"type": "string", "minLength": 1},
                "audience": {"type": "string", "minLength": 1},
                "caCert": {"type": "string", "contentEncoding": "base64"},  # format: byte
            },
        },
    },
}

# (apiVersion, kind) -> schema
CRD_SCHEMAS = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): _CLASS,
    ("groupsnapshot.storage.k8s.io/v1", "VolumeGroupSnapshotClass"): _CLASS,
    ("cbt.storage.k8s.io/v1alpha1", "SnapshotMetadataService"): _SNAPSHOT_METADATA_SERVICE,
}
