"""A whole Tandem cluster on one machine, for tests: zones as network namespaces.

    with TandemCluster(root).up() as cluster:
        vol = cluster.controller(0).stubs().controller.CreateVolume(...)
        node = cluster.node_of(vol)                 # the NodeProc holding it
        node.stubs().node.NodeStageVolume(...)
        cluster.cut(1); ...; cluster.heal(1)        # zone 1's link down (silent), back up
        cluster.controller(cluster.leader()).kill() # SIGKILL the leading controller
        cluster.etcd.kill(0); cluster.etcd.restart(0)

Layout (mirror/testkit.Topology): a bridge namespace, zones z1..zN (addresses
198.18.0.11..), and one more namespace (x1, 198.18.0.101) for the controllers. Each zone
holds one etcd member (TLS, plus a unix socket the test reads it through) and one node
process (`tandem-csi --mode node`, its own state dir and pool, the agent API on its zone
address with mutual TLS). The controllers (`--mode controller`) run in x1. Every CSI
socket is a unix socket under the cluster's root: files are reachable from the root
namespace, where the test runs, and no test address ever exists there.

Processes start in parallel (etcd first, then nodes and controllers together) and die
with the test process (setpriv --pdeathsig), and down() removes everything, also after a
failed or half-done up(). Timings are short so failures show quickly: registration and
leader leases of 3 s, a reconcile round every 2 s.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from control.election import Election
from control.etcd_client import EtcdConfig
from control.etcd_store import EtcdStore
from control.leader import ELECTION
from control.registration import NODE
from control.topology import TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY
from mirror.testkit import Topology
from proto import csi_pb2, csi_pb2_grpc
from tests import support
from tests.etcd_cluster import DIE_WITH_PARENT, EtcdCluster
from tests.pki import CertificateAuthority, KeyPair

AGENT_PORT = 7600
REPLICA_PORT = 7400
AGENT_NAME = "tandem-agent"
NAMESPACE = "/tandem/"
REPO = support.REPO


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    agent: KeyPair  # every node agent's server certificate (one Secret for all)
    controller: KeyPair  # the controllers' client certificate

    def agent_args(self, pair: KeyPair) -> list[str]:
        return ["--agent-ca", self.ca.cert_file, "--agent-cert", pair.cert_file,
                "--agent-key", pair.key_file]


class Proc:
    """A tandem-csi process in a namespace, serving a CSI unix socket."""

    def __init__(self, name: str, netns: str, directory: str, argv: list[str],
                 env: dict[str, str] | None = None):
        self.name = name
        self.netns = netns
        self.directory = directory
        self.endpoint = f"unix://{directory}/csi.sock"
        self.argv = argv  # after `python -m csi.server`
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(directory, "tandem.log")
        os.makedirs(directory, exist_ok=True)

    def launch(self, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
               wrap: tuple[str, ...] = ()) -> Proc:
        """Start it (from the calling thread: the child dies with that thread); does not
        wait for it to be ready (wait_ready). env and args: for this start only (a crash
        point armed, a flag changed: a later flag of the same name wins). wrap: a command
        line it runs under (`unshare --mount ...`: restarted in a new mount namespace)."""
        assert not self.running(), f"{self.name} is running"
        full_env = {**os.environ, **self.env, **(env or {})}
        argv = [*DIE_WITH_PARENT, *wrap, "nsenter", f"--net=/run/netns/{self.netns}", "--",
                sys.executable, "-m", "csi.server", "--endpoint", self.endpoint, *self.argv,
                *args]
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')} {env or ''} {args}\n".encode())
            self.proc = subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def start(self, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
              timeout_s: float = 60.0, wrap: tuple[str, ...] = ()) -> Proc:
        self.launch(env, args, wrap)
        self.wait_ready(timeout_s)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        """The Identity service answers ready (raises if the process has exited)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
        try:
            with grpc.insecure_channel(self.endpoint) as ch:
                rsp = csi_pb2_grpc.IdentityStub(ch).Probe(csi_pb2.ProbeRequest(), timeout=1)
                return rsp.ready.value
        except grpc.RpcError:
            return False

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        wait_for(self.ready, timeout_s, f"{self.name} ready", self.log)

    def stubs(self) -> support.Stubs:
        return support.Stubs(grpc.insecure_channel(self.endpoint))

    def kill(self) -> None:
        """SIGKILL, as a crash: no cleanup of any kind."""
        self.stop(signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-6000:]
        except FileNotFoundError:
            return ""


class NodeProc(Proc):
    def __init__(self, cluster: TandemCluster, zone: int):
        self.zone_index = zone
        self.node_id = f"node-z{zone}"
        self.zone = f"zone-{zone}"
        self.address = cluster.topo.zone_ip(zone)
        directory = os.path.join(cluster.root, f"z{zone}")
        self.state_dir = os.path.join(directory, "state")
        self.pool_dir = os.path.join(self.state_dir, "pool")
        # its own zone's etcd member first: that is the one it sticks to
        etcd = [cluster.etcd.members[zone - 1].endpoint] + [
            m.endpoint for m in cluster.etcd.members if m.host != self.address]
        super().__init__(self.node_id, cluster.topo.ns(f"z{zone}"), directory, [
            "--mode", "node", "--node-id", self.node_id, "--zone", self.zone,
            "--state-dir", self.state_dir, "--pool-size-gib", "8",
            "--max-volumes-per-node", "8", "--node-iops-capacity", "100000",
            *cluster.store_args(etcd),
            "--agent-listen", f"{self.address}:{AGENT_PORT}",
            *cluster.pki.agent_args(cluster.pki.agent),
            "--registration-ttl", str(cluster.lease_ttl_s),
            "--registration-refresh", "2", *cluster.mirror_args(self.address),
            *cluster.node_args], cluster.env)

    def data_path_pids(self) -> list[int]:
        """Its replica service and its frontends' processes: they outlive the node process
        on purpose (a restarted agent adopts them), so they are found by their pid files."""
        pids = []
        for pattern in ("pool/replicas/service.pid", "frontends/*/worker.pid",
                        "frontends/*/holder.pid"):
            for path in glob.glob(os.path.join(self.state_dir, pattern)):
                try:
                    with open(path) as f:
                        pids.append(int(f.read().strip()))
                except (OSError, ValueError):
                    continue
        return pids

    def kill_data_path(self) -> None:
        """SIGKILL everything of this node's data path (a dead node)."""
        for pid in self.data_path_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class ControllerProc(Proc):
    def __init__(self, cluster: TandemCluster, index: int):
        self.index = index
        self.controller_id = f"ctl-{index}"
        directory = os.path.join(cluster.root, f"ctl{index}")
        super().__init__(self.controller_id, cluster.topo.ns("x1"), directory, [
            "--mode", "controller", "--controller-id", self.controller_id,
            "--state-dir", os.path.join(directory, "state"),
            "--max-volumes-per-node", "8",
            *cluster.store_args([m.endpoint for m in cluster.etcd.members]),
            *cluster.pki.agent_args(cluster.pki.controller),
            "--leader-ttl", str(cluster.lease_ttl_s),
            "--reconcile-interval", str(cluster.reconcile_interval_s),
            "--intent-timeout", str(cluster.intent_timeout_s), *cluster.controller_args],
            cluster.env)


@contextlib.contextmanager
def running(request, prefix: str, **options) -> Iterator[TandemCluster]:
    """A cluster for a fixture's scope (root needed): up, its processes' logs printed when
    a test in that scope failed, everything removed after."""
    from tests.conftest import require_root  # pytest's module: only where a fixture asks
    require_root()
    root = support.make_root(prefix)
    cluster = TandemCluster(root, **options)
    failed = request.session.testsfailed
    try:
        cluster.up()
        yield cluster
    finally:
        if request.session.testsfailed > failed:
            print(cluster.logs())  # shown with the failure: what each process said
        cluster.down()
        support.cleanup_tree(root)


# what an external-provisioner retries on a DeleteVolume (it retries every error, with
# backoff): a replica its frontend just let go of (FAILED_PRECONDITION), another call on the
# volume still running (ABORTED), etcd slow to answer on this loaded machine (UNAVAILABLE)
RETRIED_BY_THE_PROVISIONER = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED,
                              grpc.StatusCode.UNAVAILABLE)


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str,
             details: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s}s\n{details()}")
        time.sleep(0.05)


class TandemCluster:
    def __init__(self, root: str, zones: int = 3, controllers: int = 2, *,
                 lease_ttl_s: int = 3, reconcile_interval_s: float = 2.0,
                 intent_timeout_s: float = 600.0, node_args: tuple[str, ...] = (),
                 controller_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 mirror: bool = False, frontend_lease_ttl_s: int = 6,
                 fence_margin_s: float = 2.0, extra_hosts: int = 1):
        """mirror: the nodes serve replicas and run frontends (mirrored volumes).
        frontend_lease_ttl_s, fence_margin_s: with renewals every second, 6 and 2 leave the
        frontends a 2 s window to serve on their replicas' word when etcd is unreachable
        (control/frontend_main.py proof_window); below 5 s of TTL minus margin, none.
        extra_hosts: namespaces beside the zones (x1 holds the controllers; x2.. are the
        test's, e.g. for an S3 server: `topo.ns("x2")`, `topo.host_ip(2)`)."""
        assert extra_hosts >= 1, "x1 holds the controllers"
        assert os.geteuid() == 0, "needs root: namespaces, loop devices, mounts"
        self.root = root
        self.zones = zones
        self.lease_ttl_s = lease_ttl_s
        self.reconcile_interval_s = reconcile_interval_s
        self.intent_timeout_s = intent_timeout_s
        self.node_args, self.controller_args = tuple(node_args), tuple(controller_args)
        self.env = env or {}
        self.mirror = mirror
        self.frontend_lease_ttl_s, self.fence_margin_s = frontend_lease_ttl_s, fence_margin_s
        self.mirror_key = os.path.join(root, "mirror.key")
        self.topo = Topology(zones, prefix=f"tdm-cl-{uuid.uuid4().hex[:6]}",
                             extra_hosts=extra_hosts)
        self.etcd: EtcdCluster = None  # type: ignore[assignment]  # made in up()
        self.pki: Pki = None  # type: ignore[assignment]
        self.nodes: list[NodeProc] = []
        self.controllers: list[ControllerProc] = []
        self._n_controllers = controllers
        self._store: EtcdStore | None = None

    # --- life cycle ---------------------------------------------------------------------
    def up(self, timeout_s: float = 90.0) -> TandemCluster:
        try:
            self.topo.up()
            if self.mirror:
                with open(self.mirror_key, "wb") as f:
                    f.write(os.urandom(24).hex().encode())
                os.chmod(self.mirror_key, 0o600)
            ca = CertificateAuthority.create(os.path.join(self.root, "pki"))
            self.pki = Pki(ca, ca.issue("agent", dns=[AGENT_NAME]), ca.issue("controller"))
            self.etcd = EtcdCluster(self.root, tls=True, places=[
                (self.topo.ns(f"z{i}"), self.topo.zone_ip(i))
                for i in range(1, self.zones + 1)])
            self.etcd.start(timeout_s=timeout_s)
            self.nodes = [NodeProc(self, i) for i in range(1, self.zones + 1)]
            self.controllers = [ControllerProc(self, j) for j in range(self._n_controllers)]
            for p in [*self.nodes, *self.controllers]:
                p.launch()
            self.wait_ready(timeout_s)
        except BaseException:
            self.down()
            raise
        return self

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Every running process ready, every running node registered, and every running
        controller knowing every registered node's zone."""
        procs = [p for p in [*self.nodes, *self.controllers] if p.running()]
        wait_for(lambda: all(p.ready() for p in procs), timeout_s, "processes ready",
                 lambda: "\n".join(f"--- {p.name}\n{p.log()[-1500:]}" for p in procs))
        running = [n for n in self.nodes if n.running()]
        wait_for(lambda: set(self.registered()) >= {n.node_id for n in running}, timeout_s,
                 "nodes registered", lambda: str(self.registered()))
        for c in self.controllers:
            if c.running():
                wait_for(lambda c=c: all(self.capacity(c, n.zone) > 0 for n in running),
                         timeout_s, f"{c.name} knows every node")

    def down(self) -> None:
        for p in [*self.controllers, *self.nodes]:
            try:
                p.kill()
            except Exception:  # noqa: BLE001 - everything else must still go
                pass
        for n in self.nodes:
            n.kill_data_path()
        if self._store is not None:
            self._store.close()
            self._store = None
        if self.etcd is not None:
            self.etcd.close()
        self.topo.down()

    def logs(self, tail_chars: int = 4000) -> str:
        """The end of every process's log, for a failure's report."""
        out = []
        for p in [*self.controllers, *self.nodes]:
            out.append(f"===== {p.name} ({'running' if p.running() else 'stopped'})\n"
                       f"{p.log()[-tail_chars:]}")
        if self.etcd is not None:
            out += [f"===== etcd {m.name}\n{m.log()[-1000:]}" for m in self.etcd.members]
        return "\n".join(out)

    def __enter__(self) -> TandemCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- arguments ---------------------------------------------------------------------
    def mirror_args(self, address: str) -> list[str]:
        if not self.mirror:
            return []
        return ["--replica-listen", f"{address}:{REPLICA_PORT}", "--mirror-key",
                self.mirror_key, "--frontend-lease-ttl", str(self.frontend_lease_ttl_s),
                "--fence-margin", str(self.fence_margin_s)]

    def store_args(self, endpoints: list[str]) -> list[str]:
        tls = self.etcd.tls
        assert tls is not None
        return ["--store", "etcds://" + ",".join(endpoints), "--store-ca", tls.ca.cert_file,
                "--store-cert", tls.client.cert_file, "--store-key", tls.client.key_file,
                "--store-namespace", NAMESPACE, "--store-timeout", "5"]

    # --- parts ---------------------------------------------------------------------------
    def node(self, zone: int) -> NodeProc:
        """The node process of zone `zone` (1-based, as the zones' names)."""
        return self.nodes[zone - 1]

    def controller(self, index: int) -> ControllerProc:
        return self.controllers[index]

    def node_of(self, volume: csi_pb2.Volume) -> NodeProc:
        """The node a volume was placed on (its accessible topology says)."""
        node_id = volume.accessible_topology[0].segments[TOPOLOGY_NODE_KEY]
        return next(n for n in self.nodes if n.node_id == node_id)

    def zone_segments(self, zone: int) -> csi_pb2.Topology:
        return csi_pb2.Topology(segments={TOPOLOGY_ZONE_KEY: f"zone-{zone}"})

    # --- faults --------------------------------------------------------------------------
    def cut(self, zone: int) -> None:
        """Zone `zone`'s link goes down: its packets vanish (no reset, no ICMP)."""
        self.topo.cut(zone)

    def heal(self, zone: int) -> None:
        self.topo.heal(zone)

    def etcd_leader_zone(self) -> int | None:
        index = self.etcd.leader_index()
        return None if index is None else index + 1

    # --- looking at the cluster (the test's own etcd client, through the unix sockets) ----
    def store(self) -> EtcdStore:
        if self._store is None:
            self._store = EtcdStore(EtcdConfig(
                endpoints=tuple(m.local_target for m in self.etcd.members),
                namespace=NAMESPACE, timeout_s=5, attempt_timeout_s=1))
        return self._store

    def registered(self) -> list[str]:
        return sorted(key[len(NODE):] for key, _ in self.store().list(NODE))

    def leader(self) -> int | None:
        """The index of the controller that leads (None while none does)."""
        current = Election(self.store(), ELECTION).leader()
        if current is None:
            return None
        return next((c.index for c in self.controllers if c.controller_id == current.value),
                    None)

    def wait_leader(self, timeout_s: float = 30.0, other_than: int | None = None) -> int:
        def found() -> bool:
            got = self.leader()
            return got is not None and got != other_than

        wait_for(found, timeout_s, "a controller leads")
        leader = self.leader()
        assert leader is not None
        return leader

    @staticmethod
    def capacity(controller: Proc, zone: str) -> int:
        try:
            with grpc.insecure_channel(controller.endpoint) as ch:
                rsp = csi_pb2_grpc.ControllerStub(ch).GetCapacity(csi_pb2.GetCapacityRequest(
                    accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_ZONE_KEY: zone})),
                    timeout=2)
                return rsp.available_capacity
        except grpc.RpcError:
            return 0


def main() -> None:
    """`python -m tests.cluster`: a cluster for trying things by hand (csi-sanity, say);
    prints the sockets, runs until Enter or Ctrl-C, then removes everything. --mirror: the
    nodes serve replicas and frontends (mirrored volumes: `replicas: 3`)."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m tests.cluster")
    parser.add_argument("--mirror", action="store_true")
    parser.add_argument("--zones", type=int, default=3)
    opts = parser.parse_args()
    root = support.make_root("tdm-cluster-")
    cluster = TandemCluster(root, zones=opts.zones, mirror=opts.mirror)
    try:
        cluster.up()
        print(f"root {root}")
        for c in cluster.controllers:
            print(f"controller {c.controller_id}: {c.endpoint}")
        for n in cluster.nodes:
            print(f"node {n.node_id} ({n.zone}): {n.endpoint}")
        print("ready; Enter stops", flush=True)
        try:
            sys.stdin.readline()
        except KeyboardInterrupt:
            pass
    finally:
        cluster.down()
        support.cleanup_tree(root)


if __name__ == "__main__":
    main()
