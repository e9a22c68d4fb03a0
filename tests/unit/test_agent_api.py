"""The node agent API end to end in one process: AgentClient -> gRPC over TCP with mutual
TLS -> AgentServer -> an in-memory node. Results come back equal, domain errors come back
as their own class, an unreachable or silent node is Unavailable within the deadline,
and peers without a certificate from the CA are refused. Certificates are rotated under
a running server and client."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import grpc
import pytest

from control.agent_client import AgentClient
from control.agent_server import AgentServer
from control.agent_tls import ReloadingTls, TlsFiles
from control.node_api import (
    NewVolume,
    SnapshotMember,
    VolumeSource,
)
from engine import errors
from engine.qos.tiers import QosSpec
from proto import agent_pb2, agent_pb2_grpc
from tests.fake_nodes import GIB, FakeNode
from tests.pki import CertificateAuthority

AGENT_NAME = "tandem-agent"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("agent-pki")
    ca = CertificateAuthority.create(str(root / "ca"))
    other = CertificateAuthority.create(str(root / "other"), name="Someone else's CA")
    return {
        "ca": ca,
        "agent": ca.issue("agent", dns=[AGENT_NAME]),
        "controller": ca.issue("controller"),
        "stranger": other.issue("stranger"),
        "other": other,
        "agent-by-other": other.issue("agent2", dns=[AGENT_NAME]),
    }


def tls(pki, name: str, ca: str = "ca", **kw) -> ReloadingTls:
    pair = pki[name]
    return ReloadingTls(TlsFiles(pki[ca].cert_file, pair.cert_file, pair.key_file), **kw)


class Agent:
    def __init__(self, pki, node: FakeNode):
        self.node = node
        self.server = AgentServer(node, "127.0.0.1:0", tls(pki, "agent"))
        self.server.start()
        self.client = AgentClient(node.node_id, self.server.address, tls(pki, "controller"),
                                  read_timeout_s=5, write_timeout_s=5)

    def close(self) -> None:
        self.client.close()
        self.server.stop(0)


@pytest.fixture
def agent(pki):
    a = Agent(pki, FakeNode("n1", "z1", free_bytes=50 * GIB, iops_capacity=7000,
                            max_volumes=33))
    yield a
    a.close()


def spec(volume_id: str = "vol-a", size: int = GIB, version: int = 5) -> NewVolume:
    return NewVolume(volume_id, size, ("mount",), QosSpec("gold", 1, 1, 10, 10, 5, 5),
                     VolumeSource(), version)


def test_every_call_returns_what_the_node_returned(agent):
    node, client = agent.node, agent.client
    assert client.node_id == "n1"
    assert client.info() == node.info()
    made = client.create_volume(spec())
    assert made == node.held["vol-a"]
    assert client.create_volume(spec()) == made  # idempotent through the wire too
    assert client.volume("vol-a") == node.volume("vol-a")
    assert client.volume("vol-missing") is None
    assert client.volumes(("vol-a", "vol-missing")) == node.volumes(("vol-a",))
    assert client.volumes(()) == ()
    grown = client.expand_volume("vol-a", 2 * GIB, 6)
    assert grown.size_bytes == 2 * GIB and grown.version == 6
    client.set_qos("vol-a", QosSpec("bronze"), 7)
    assert node.held["vol-a"].qos == QosSpec("bronze")
    snaps = client.create_snapshots((SnapshotMember("snap-a", "vol-a"),))
    assert snaps == (node.snapshots["snap-a"],)
    assert client.snapshot("snap-a") == node.snapshots["snap-a"]
    assert client.snapshot("snap-missing") is None
    assert client.allocated_ranges("snap-a") == ()
    assert client.changed_ranges("snap-a", "snap-a") == ()
    assert client.inventory() == node.inventory()
    client.delete_snapshot("snap-a")
    assert "snap-a" not in node.snapshots
    client.delete_volume("vol-a", 8)
    assert "vol-a" not in node.held
    client.delete_volume("vol-a", 8)  # gone already: success
    assert [c for c, _ in node.calls].count("create_volume") == 2


@pytest.mark.parametrize("make, expected", [
    (lambda c, n: c.expand_volume("vol-missing", GIB, 1), errors.NotFound),
    (lambda c, n: c.create_volume(spec(size=3 * GIB)), errors.AlreadyExists),
    (lambda c, n: c.delete_volume("vol-a", 1), errors.StaleVersion),
    (lambda c, n: (n.staged.add("vol-a"), c.delete_volume("vol-a", 5)), errors.InUse),
    (lambda c, n: setattr(n, "fail_creates", True) or c.create_volume(spec("vol-b")),
     errors.Unavailable),
])
def test_domain_errors_come_back_as_their_own_class(agent, make, expected):
    agent.client.create_volume(spec())
    with pytest.raises(expected) as caught:
        make(agent.client, agent.node)
    assert type(caught.value) is expected  # StaleVersion, not just Busy; InUse, not Precondition


class Raising(FakeNode):
    """Raises a given exception from info()."""

    def __init__(self, exc: BaseException):
        super().__init__("n-raise", "z1")
        self.exc = exc

    def info(self):
        raise self.exc


@pytest.mark.parametrize("exc, expected", [
    (errors.Precondition("device held open"), errors.Precondition),
    (errors.OutOfCapacity("pool full"), errors.OutOfCapacity),
    (errors.InvalidSpec("bad"), errors.InvalidSpec),
    (errors.OutOfRange("too big"), errors.OutOfRange),
    (errors.DataLoss("lost"), errors.DataLoss),
    (errors.Busy("busy"), errors.Busy),
    (RuntimeError("a bug"), errors.EngineError),  # INTERNAL: not a domain error of ours
])
def test_error_classes_and_messages(pki, exc, expected):
    a = Agent(pki, Raising(exc))
    try:
        with pytest.raises(errors.EngineError) as caught:
            a.client.info()
        assert type(caught.value) is expected
        assert str(exc) in str(caught.value)
    finally:
        a.close()


def test_a_node_that_is_gone_is_unavailable_quickly(pki):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    client = AgentClient("n-gone", f"127.0.0.1:{port}", tls(pki, "controller"),
                         read_timeout_s=3, write_timeout_s=3)
    try:
        started = time.monotonic()
        with pytest.raises(errors.Unavailable, match="n-gone"):
            client.info()
        assert time.monotonic() - started < 3.5
    finally:
        client.close()


def test_a_silent_node_is_unavailable_at_the_deadline(pki):
    """A listener that accepts and never answers (a hung agent, a cut link): the call
    ends as Unavailable by its deadline, not as an answer of the node's."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        client = AgentClient("n-silent", f"127.0.0.1:{listener.getsockname()[1]}",
                             tls(pki, "controller"), read_timeout_s=1, write_timeout_s=1)
        try:
            started = time.monotonic()
            with pytest.raises(errors.Unavailable, match="n-silent"):
                client.volume("vol-a")
            assert time.monotonic() - started < 3
        finally:
            client.close()


def _raw_info(address: str, creds) -> agent_pb2.InfoReply:
    options = [("grpc.ssl_target_name_override", AGENT_NAME)]
    with grpc.secure_channel(address, creds, options=options) as ch:
        return agent_pb2_grpc.NodeAgentStub(ch).Info(agent_pb2.InfoRequest(), timeout=3)


def test_peers_need_a_certificate_from_the_ca(agent, pki):
    ca = pki["ca"].cert_pem()
    # no client certificate at all
    with pytest.raises(grpc.RpcError) as e:
        _raw_info(agent.server.address, grpc.ssl_channel_credentials(ca))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # a certificate from another CA
    stranger = pki["stranger"]
    with pytest.raises(grpc.RpcError) as e:
        _raw_info(agent.server.address,
                  grpc.ssl_channel_credentials(ca, stranger.key_pem(), stranger.cert_pem()))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # plain text
    with grpc.insecure_channel(agent.server.address) as ch, pytest.raises(grpc.RpcError):
        agent_pb2_grpc.NodeAgentStub(ch).Info(agent_pb2.InfoRequest(), timeout=3)
    # and the controller's own
    controller = pki["controller"]
    assert _raw_info(agent.server.address, grpc.ssl_channel_credentials(
        ca, controller.key_pem(), controller.cert_pem())).result.node_id == "n1"


def test_certificates_are_reloaded_when_rotated(pki, tmp_path):
    """The Secret is rotated to another CA: the running server presents the new
    certificate and accepts only clients of the new CA from the next handshake on; a
    running client picks up its new files by itself."""
    def install(directory, ca, pair) -> None:
        # as the kubelet updates a Secret: new files, then one rename makes them current
        staging = tmp_path / f"{directory}.new"
        staging.mkdir()
        for src, name in ((ca.cert_file, "ca.crt"), (pair.cert_file, "tls.crt"),
                          (pair.key_file, "tls.key")):
            shutil.copy(src, staging / name)
        target = tmp_path / directory
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)

    install("agent", pki["ca"], pki["agent"])
    install("controller", pki["ca"], pki["controller"])

    def files(directory) -> TlsFiles:
        d = tmp_path / directory
        return TlsFiles(str(d / "ca.crt"), str(d / "tls.crt"), str(d / "tls.key"))

    server = AgentServer(FakeNode("n1", "z1"), "127.0.0.1:0",
                         ReloadingTls(files("agent"), check_interval_s=0))
    server.start()
    client = AgentClient("n1", server.address, ReloadingTls(files("controller"),
                                                            check_interval_s=0),
                         read_timeout_s=3)
    old_controller = pki["controller"]
    try:
        assert client.info().node_id == "n1"
        install("agent", pki["other"], pki["agent-by-other"])
        # a client still on the old CA is refused at its next handshake
        with pytest.raises(grpc.RpcError):
            _raw_info(server.address, grpc.ssl_channel_credentials(
                pki["ca"].cert_pem(), old_controller.key_pem(), old_controller.cert_pem()))
        install("controller", pki["other"], pki["stranger"])
        assert client.info().node_id == "n1"  # a new channel with the new files
    finally:
        client.close()
        server.stop(0)


def test_concurrent_calls_share_one_channel(agent):
    """The controller's request threads all call one client at once."""
    failures = []

    def work(i: int) -> None:
        try:
            for j in range(5):
                agent.client.create_volume(spec(f"vol-{i}-{j}"))
                assert agent.client.volume(f"vol-{i}-{j}") is not None
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            failures.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(agent.node.held) == 40
