"""`tandem-csi --mode`: all-in-one stays as it was; the cluster modes refuse to start
without what they need, with a message that says what is missing."""

from __future__ import annotations

import pytest

from csi import cluster_config
from csi.config import DEFAULT_ZONE
from csi.server import make_driver, parse_args

TLS = ["--agent-ca", "ca.crt", "--agent-cert", "tls.crt", "--agent-key", "tls.key"]
ETCD = ["--store", "etcds://198.18.0.11:2379"]


def test_all_in_one_is_the_default_and_unchanged():
    config = parse_args(["--endpoint", "unix:///tmp/x.sock"])
    assert config.mode == cluster_config.ALL_IN_ONE
    assert config.zone == DEFAULT_ZONE  # csi-sanity starts it without --zone
    assert config.cluster == cluster_config.ClusterConfig()
    assert type(make_driver(config)).__name__ == "Driver"


def test_node_mode():
    config = parse_args(["--mode", "node", "--node-id", "w1", *ETCD, *TLS,
                         "--agent-listen", "198.18.0.11:7600"])
    assert config.zone == ""  # looked up at start, never a default
    assert config.cluster.agent_address == "198.18.0.11:7600"
    assert config.cluster.kube_node_name == "w1"
    assert config.cluster.agent_tls.cert_file.endswith("/tls.crt")
    assert type(make_driver(config)).__name__ == "NodeDriver"


def test_controller_mode():
    config = parse_args(["--mode", "controller", *ETCD, *TLS, "--controller-id", "c1"])
    assert config.cluster.controller_id == "c1"
    assert type(make_driver(config)).__name__ == "ControllerDriver"


@pytest.mark.parametrize("argv, message", [
    (["--mode", "node", *ETCD, "--agent-listen", "198.18.0.11:7600"], "--agent-ca"),
    (["--mode", "node", *TLS, "--agent-listen", "198.18.0.11:7600"], "etcds://"),
    (["--mode", "controller", *TLS, "--store", "sqlite:/tmp/c.sqlite"], "etcds://"),
    (["--mode", "node", *ETCD, *TLS], "--agent-listen HOST:PORT"),
    (["--mode", "node", *ETCD, *TLS, "--agent-listen", "0.0.0.0:7600"], "--agent-address"),
    (["--mode", "node", *ETCD, *TLS, "--agent-listen", "198.18.0.11:port"], "HOST:PORT"),
    (["--mode", "controller", *ETCD, *TLS, "--leader-ttl", "1"], "at least 2 seconds"),
    (["--mode", "cluster"], "invalid choice"),
])
def test_cluster_modes_refuse_what_cannot_work(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--endpoint", "unix:///tmp/x.sock", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_node_without_a_zone_does_not_start(monkeypatch, tmp_path):
    """Neither --zone nor a Kubernetes node to read the label from: a clear start-up
    error before anything is touched (no state dir, no pool)."""
    from csi.server import StartupError

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = parse_args(["--endpoint", f"unix://{tmp_path}/csi.sock", "--mode", "node",
                         "--state-dir", str(tmp_path / "state"), *ETCD, *TLS,
                         "--agent-listen", "198.18.0.11:7600"])
    driver = make_driver(config)
    with pytest.raises(StartupError, match="zone is unknown.*not running in a Kubernetes "
                                           "pod.*--zone"):
        driver.start()
    assert not (tmp_path / "state").exists()
