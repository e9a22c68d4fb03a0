"""Real etcd members on loopback for tests: 1 or N of them, free ports, data under a temp dir.

    with EtcdCluster(tmp_dir, size=3) as cluster:
        store = EtcdStore(EtcdConfig.from_url(cluster.url))
        cluster.kill(0); ...; cluster.restart(0)

Members can also live in network namespaces (zones, tests/cluster.py): `places=[(netns,
address), ...]`, one per member. Each then listens on its address (ports 2379/2380: the
namespace is its own), is started inside its namespace (`nsenter --net`: the mounts stay
the machine's), and also on a unix socket under the cluster's directory, which the test
process (in the root namespace, where no test address may exist) uses to look at it.

Members are started with fast raft timings (heartbeat 50 ms, election 500 ms) and fsync
left on (no --unsafe-no-fsync): durability tests mean something. Every process is killed
and every data dir removed on close, whatever the test did; members also die with the
process that started them (`setpriv --pdeathsig`), so a killed test run leaves none behind.
(Not a preexec_fn: forking with Python code in the child deadlocks beside gRPC's threads.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass

import grpc

from proto.etcd import rpc_pb2, rpc_pb2_grpc
from tests.pki import CertificateAuthority, KeyPair

ETCD = "/usr/bin/etcd"
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"]  # util-linux


def free_ports(n: int) -> list[int]:
    """n distinct ports free right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class EtcdTls:
    """Server certificates for the members, and a client pair signed by the same CA."""

    ca: CertificateAuthority
    server: KeyPair
    client: KeyPair

    @classmethod
    def create(cls, directory: str, ips: tuple[str, ...] = ()) -> EtcdTls:
        ca = CertificateAuthority.create(directory)
        return cls(ca, ca.issue("etcd-server", ip=["127.0.0.1", *ips], dns=["localhost"]),
                   ca.issue("etcd-client"))


class Member:
    def __init__(self, cluster: EtcdCluster, index: int, client_port: int, peer_port: int,
                 netns: str = "", host: str = "127.0.0.1"):
        self.cluster = cluster
        self.name = f"m{index}"
        self.client_port = client_port
        self.peer_port = peer_port
        self.netns = netns  # "" : the test's own namespace
        self.host = host
        self.data_dir = os.path.join(cluster.root, self.name)
        self.log_path = os.path.join(cluster.root, f"{self.name}.log")
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self.stopped = False  # by us: an exit is expected

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def local_socket(self) -> str:
        """A member in a namespace also listens here (etcd names the socket file after
        the URL's host:port, in its working directory)."""
        return os.path.join(self.cluster.root, f"{self.name}-local:{self.client_port}")

    @property
    def local_target(self) -> str:
        """How the test process reaches this member (gRPC target; plain on the socket)."""
        return f"unix:{self.local_socket}" if self.netns else self.endpoint

    def argv(self) -> list[str]:
        c = self.cluster
        scheme = "https" if c.tls else "http"
        client_url = f"{scheme}://{self.endpoint}"
        listen = client_url
        if self.netns:  # plain: only processes that can open the file reach it
            listen += f",unix://{self.name}-local:{self.client_port}"
        argv = [ETCD, "--name", self.name, "--data-dir", self.data_dir,
                "--listen-client-urls", listen, "--advertise-client-urls", client_url,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", ",".join(f"{m.name}={m.peer_url}" for m in c.members),
                "--initial-cluster-state", "new", "--initial-cluster-token", c.token,
                "--heartbeat-interval", "50", "--election-timeout", "500", "--pre-vote",
                "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"]
        if c.tls:
            argv += ["--cert-file", c.tls.server.cert_file, "--key-file", c.tls.server.key_file,
                     "--trusted-ca-file", c.tls.ca.cert_file, "--client-cert-auth"]
        return argv

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        enter = ["nsenter", f"--net=/run/netns/{self.netns}", "--"] if self.netns else []
        if self.netns and os.path.exists(self.local_socket):
            os.unlink(self.local_socket)  # left by a killed member: etcd would not bind
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(DIE_WITH_PARENT + enter + self.argv(), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.cluster.root)
        self.paused = False
        self.stopped = False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        self.stopped = True
        if not self.running():
            return
        assert self.proc is not None
        if self.paused:
            self.proc.send_signal(signal.SIGCONT)
            self.paused = False
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-3000:]
        except FileNotFoundError:
            return ""

    def channel(self) -> grpc.Channel:
        tls = self.cluster.tls
        if tls is None or self.netns:
            return grpc.insecure_channel(self.local_target)
        creds = grpc.ssl_channel_credentials(tls.ca.cert_pem(), tls.client.key_pem(),
                                             tls.client.cert_pem())
        return grpc.secure_channel(self.local_target, creds)

    def status(self) -> rpc_pb2.StatusResponse | None:
        """etcd's Maintenance.Status of this member (None when it does not answer)."""
        if not self.running() or self.paused:
            return None
        try:
            with self.channel() as ch:
                return rpc_pb2_grpc.MaintenanceStub(ch).Status(rpc_pb2.StatusRequest(),
                                                               timeout=1.0)
        except grpc.RpcError:
            return None

    def healthy(self) -> bool:
        """A linearizable read answers: the member is up and sees a leader. The answer must
        come from this cluster (a port freed by a killed member can be taken by anyone on a
        shared machine) and the process must still run afterwards."""
        if not self.running() or self.paused:
            return False
        try:
            with self.channel() as ch:
                rsp = rpc_pb2_grpc.KVStub(ch).Range(rpc_pb2.RangeRequest(key=b"health"),
                                                    timeout=0.5)
        except grpc.RpcError:
            return False
        if self.cluster.cluster_id is None:
            self.cluster.cluster_id = rsp.header.cluster_id
        elif rsp.header.cluster_id != self.cluster.cluster_id:
            raise RuntimeError(f"{self.endpoint} answers for another etcd cluster: its port "
                               f"was taken while {self.name} was down")
        return self.running()


class EtcdCluster:
    def __init__(self, root: str, size: int = 1, *, tls: bool = False,
                 places: list[tuple[str, str]] | None = None):
        """places: (network namespace, address) of each member (then size = len(places))."""
        if not os.path.exists(ETCD):
            raise RuntimeError(f"{ETCD} is missing: apt-get install etcd-server "
                               "(scripts/install.sh --dev does)")
        self.root = os.path.join(root, f"etcd-{uuid.uuid4().hex[:6]}")
        os.makedirs(self.root)
        self.token = f"tdm-{uuid.uuid4().hex[:8]}"
        self.cluster_id: int | None = None  # learnt from the first answer
        hosts = tuple(host for _, host in places or ())
        self.tls = EtcdTls.create(os.path.join(self.root, "pki"), hosts) if tls else None
        self.members: list[Member] = []
        if places:
            for i, (netns, host) in enumerate(places):
                self.members.append(Member(self, i, 2379, 2380, netns, host))
            return
        ports = free_ports(2 * size)
        for i in range(size):
            self.members.append(Member(self, i, ports[2 * i], ports[2 * i + 1]))

    # -- addresses -------------------------------------------------------------------
    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        scheme = "etcds" if self.tls else "etcd"
        return f"{scheme}://{','.join(self.endpoints)}"

    # -- life cycle --------------------------------------------------------------------
    def start(self, timeout_s: float = 20.0) -> EtcdCluster:
        for m in self.members:
            m.start()
        self.wait_healthy(timeout_s=timeout_s)
        return self

    def wait_healthy(self, members: list[int] | None = None, timeout_s: float = 20.0) -> None:
        """Wait until the given members (default: those running) serve linearizable reads."""
        wanted = [self.members[i] for i in members] if members is not None else [
            m for m in self.members if m.running()]
        deadline = time.monotonic() + timeout_s
        while True:
            for m in wanted:
                if not m.running():
                    raise RuntimeError(f"etcd {m.name} exited: {m.log()}")
            if all(m.healthy() for m in wanted):
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {m.name}\n{m.log()}" for m in wanted)
                raise TimeoutError(f"etcd not healthy in {timeout_s}s\n{logs}")
            time.sleep(0.05)

    def leader_index(self) -> int | None:
        """The index of the member raft elected leader, as the members that answer say."""
        statuses = [m.status() for m in self.members]
        for i, st in enumerate(statuses):
            if st is not None and st.leader and st.leader == st.header.member_id:
                return i
        return None

    def check_running(self) -> None:
        """Fail, with its log, if a member that nobody stopped has exited."""
        for m in self.members:
            if m.proc is not None and m.proc.poll() is not None and not m.stopped:
                raise RuntimeError(f"etcd {m.name} exited by itself ({m.proc.returncode}):\n"
                                   f"{m.log()}")

    def stop(self, i: int) -> None:
        self.members[i].stop(signal.SIGTERM)

    def kill(self, i: int) -> None:
        self.members[i].stop(signal.SIGKILL)

    def pause(self, i: int) -> None:
        """SIGSTOP: the member keeps its sockets open but answers nothing."""
        self.members[i].send(signal.SIGSTOP)
        self.members[i].paused = True

    def resume(self, i: int) -> None:
        self.members[i].send(signal.SIGCONT)
        self.members[i].paused = False

    def restart(self, i: int, *, wait: bool = True) -> None:
        self.members[i].stop(signal.SIGTERM)
        self.members[i].start()
        if wait:
            self.wait_healthy([i])

    def close(self) -> None:
        for m in self.members:
            m.stop(signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
