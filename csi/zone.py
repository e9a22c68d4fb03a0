"""A node process's zone: its Kubernetes node's `topology.kubernetes.io/zone` label.

Read once at start through the API server with the pod's own service account (in-cluster
configuration: the mounted token and CA, KUBERNETES_SERVICE_HOST/PORT; RBAC: `get` on
nodes). `--zone` overrides it. In cluster mode there is no default: a node whose zone is
unknown would be placed as if it shared a zone with others, so it refuses to start and
says what to do.
"""

from __future__ import annotations

import os
from typing import Any

ZONE_LABEL = "topology.kubernetes.io/zone"
LOOKUP_TIMEOUT_S = 10.0


class ZoneUnknown(Exception):
    """The zone could not be learnt; the message says why and what to do."""


# The kubernetes package is imported only when the label is read: it costs half a second
# of every node process's start, and a node given --zone never needs it.
SERVICE_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
SERVICE_CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


def in_cluster_configuration(token_file: str = SERVICE_TOKEN_FILE,
                             ca_file: str = SERVICE_CA_FILE,
                             environ: dict[str, str] | None = None) -> Any:
    """The API server's address and the pod's credentials, as a pod sees them (a
    kubernetes.client.Configuration)."""
    from kubernetes import client
    from kubernetes.config.config_exception import ConfigException
    from kubernetes.config.incluster_config import InClusterConfigLoader

    configuration = client.Configuration()
    try:
        InClusterConfigLoader(token_file, ca_file, environ=os.environ if environ is None
                              else environ).load_and_set(configuration)
    except ConfigException as e:
        raise ZoneUnknown(f"not running in a Kubernetes pod ({e}); give --zone") from None
    return configuration


def zone_of_node(node_name: str, configuration: Any,
                 timeout_s: float = LOOKUP_TIMEOUT_S) -> str:
    """The zone label of the Kubernetes node `node_name`."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

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


def resolve_zone(flag: str, node_name: str, configuration: Any = None) -> str:
    """--zone when given, else the node's label read with the in-cluster configuration."""
    if flag:
        return flag
    return zone_of_node(node_name, configuration or in_cluster_configuration())
