"""A node process's zone: its Kubernetes node's `topology.kubernetes.io/zone` label.

Read once at start through the API server with the pod's own service account (in-cluster
configuration: the mounted token and CA, KUBERNETES_SERVICE_HOST/PORT; RBAC: `get` on
nodes). `--zone` overrides it. In cluster mode there is no default: a node whose zone is
unknown would be placed as if it shared a zone with others, so it refuses to start and
says what to do.
"""

from __future__ import annotations

import os

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import (
    SERVICE_CERT_FILENAME,
    SERVICE_TOKEN_FILENAME,
    InClusterConfigLoader,
)

ZONE_LABEL = "topology.kubernetes.io/zone"
LOOKUP_TIMEOUT_S = 10.0


class ZoneUnknown(Exception):
    """The zone could not be learnt; the message says why and what to do."""


def in_cluster_configuration(token_file: str = SERVICE_TOKEN_FILENAME,
                             ca_file: str = SERVICE_CERT_FILENAME,
                             environ: dict[str, str] | None = None) -> client.Configuration:
    """The API server's address and the pod's credentials, as a pod sees them."""
    configuration = client.Configuration()
    try:
        InClusterConfigLoader(token_file, ca_file, environ=os.environ if environ is None
                              else environ).load_and_set(configuration)
    except ConfigException as e:
        raise ZoneUnknown(f"not running in a Kubernetes pod ({e}); give --zone") from None
    return configuration


def zone_of_node(node_name: str, configuration: client.Configuration,
                 timeout_s: float = LOOKUP_TIMEOUT_S) -> str:
    """The zone label of the Kubernetes node `node_name`."""
    api = client.CoreV1Api(client.ApiClient(configuration))
    try:
        node = api.read_node(node_name, _request_timeout=timeout_s)
    except ApiException as e:
        hint = {403: "the service account may not read nodes (RBAC: get on nodes)",
                404: "no such node (is --node-id the Kubernetes node name?)",
                401: "the API server refused the service account's token"}.get(e.status, "")
        raise ZoneUnknown(f"reading node {node_name!r} from the API server failed: "
                          f"{e.status} {e.reason}{'; ' + hint if hint else ''}; or give "
                          "--zone") from None
    except Exception as e:  # noqa: BLE001 - connection errors come in many classes
        raise ZoneUnknown(f"the API server could not be reached to read node {node_name!r} "
                          f"({type(e).__name__}: {e}); or give --zone") from None
    labels = (node.metadata.labels or {}) if node.metadata else {}
    zone = labels.get(ZONE_LABEL, "")
    if not zone:
        raise ZoneUnknown(f"node {node_name!r} has no {ZONE_LABEL} label: label it "
                          f"(kubectl label node {node_name} {ZONE_LABEL}=<zone>) or give "
                          "--zone")
    return zone


def resolve_zone(flag: str, node_name: str,
                 configuration: client.Configuration | None = None) -> str:
    """--zone when given, else the node's label read with the in-cluster configuration."""
    if flag:
        return flag
    return zone_of_node(node_name, configuration or in_cluster_configuration())
