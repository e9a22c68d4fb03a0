"""The node's zone from its Kubernetes node object, read as a pod reads it (in-cluster
configuration: a service account token and CA, an HTTPS API server), against a tiny local
server that answers GET /api/v1/nodes/NAME as the API server would."""

from __future__ import annotations

import http.server
import json
import ssl
import threading

import pytest

from csi.zone import ZONE_LABEL, ZoneUnknown, in_cluster_configuration, resolve_zone
from tests.pki import CertificateAuthority

TOKEN = "service-account-token-of-tandem-node"


def node_object(name: str, labels: dict[str, str]) -> dict:
    return {"kind": "Node", "apiVersion": "v1",
            "metadata": {"name": name, "uid": "5b3c9f0e-1111-2222-3333-444455556666",
                         "resourceVersion": "4242", "labels": labels},
            "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.5"}]}}


class FakeApiServer:
    """HTTPS, bearer token checked, nodes served from a dict; remembers the requests."""

    def __init__(self, ca: CertificateAuthority, nodes: dict[str, dict]):
        pair = ca.issue("kube-apiserver", ip=["127.0.0.1"], dns=["kubernetes.default.svc"])
        self.ca_file = ca.cert_file
        self.nodes = nodes
        self.requests: list[tuple[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                outer.requests.append((self.path, self.headers.get("Authorization", "")))
                scheme, _, token = self.headers.get("Authorization", "").partition(" ")
                if scheme.lower() != "bearer" or token != TOKEN:  # the scheme is any case
                    return self._reply(401, {"kind": "Status", "code": 401,
                                             "reason": "Unauthorized"})
                prefix = "/api/v1/nodes/"
                name = self.path[len(prefix):] if self.path.startswith(prefix) else None
                if name not in outer.nodes:
                    return self._reply(404, {"kind": "Status", "code": 404,
                                             "reason": "NotFound",
                                             "message": f'nodes "{name}" not found'})
                return self._reply(200, outer.nodes[name])

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(pair.cert_file, pair.key_file)
        self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return CertificateAuthority.create(str(tmp_path_factory.mktemp("kube-pki")))


@pytest.fixture
def api(tmp_path, ca):
    server = FakeApiServer(ca, {
        "worker-1": node_object("worker-1", {"kubernetes.io/hostname": "worker-1",
                                             ZONE_LABEL: "eu-west-1b"}),
        "worker-2": node_object("worker-2", {"kubernetes.io/hostname": "worker-2"}),
    })
    token = tmp_path / "token"
    token.write_text(TOKEN)
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(server.port)}

    def configuration(**overrides):
        return in_cluster_configuration(str(overrides.get("token", token)), server.ca_file,
                                        overrides.get("environ", env))

    server.configuration = configuration
    server.token_file = token
    yield server
    server.close()


def test_the_zone_is_the_nodes_label(api):
    assert resolve_zone("", "worker-1", api.configuration()) == "eu-west-1b"
    assert [(path, auth.lower()) for path, auth in api.requests] == [
        ("/api/v1/nodes/worker-1", f"bearer {TOKEN}")]


def test_the_flag_overrides_the_label_and_the_api_is_not_asked(api):
    assert resolve_zone("rack-7", "worker-1", api.configuration()) == "rack-7"
    assert api.requests == []


def test_a_node_without_the_label_is_a_clear_error(api):
    with pytest.raises(ZoneUnknown, match=f"worker-2.*no {ZONE_LABEL} label.*--zone"):
        resolve_zone("", "worker-2", api.configuration())


def test_an_unknown_node_is_a_clear_error(api):
    with pytest.raises(ZoneUnknown, match="404.*--node-id"):
        resolve_zone("", "worker-9", api.configuration())


def test_a_refused_token_is_a_clear_error(api, tmp_path):
    bad = tmp_path / "bad-token"
    bad.write_text("someone-else")
    with pytest.raises(ZoneUnknown, match="401"):
        resolve_zone("", "worker-1", api.configuration(token=bad))


def test_outside_a_pod_there_is_no_default_zone(api):
    with pytest.raises(ZoneUnknown, match="not running in a Kubernetes pod.*--zone"):
        resolve_zone("", "worker-1", api.configuration(environ={}))


def test_an_unreachable_api_server_is_a_clear_error(api):
    api.close()
    with pytest.raises(ZoneUnknown, match="could not be reached.*--zone"):
        resolve_zone("", "worker-1", api.configuration())


def test_the_service_account_paths_are_kubernetes_own():
    from kubernetes.config import incluster_config

    from csi.zone import SERVICE_CA_FILE, SERVICE_TOKEN_FILE
    assert SERVICE_TOKEN_FILE == incluster_config.SERVICE_TOKEN_FILENAME
    assert SERVICE_CA_FILE == incluster_config.SERVICE_CERT_FILENAME
