"""What the cluster modes add to the configuration: `--mode`, the node agent API (where it
listens, its mutual TLS files), registration and leader-election timings.

    tandem-csi --mode all-in-one   one process, embedded store (the default; unchanged)
    tandem-csi --mode controller   Identity + Controller + GroupController +
                                   SnapshotMetadata; records in etcd; nodes through agents
    tandem-csi --mode node         Identity + Node for the kubelet, and the node agent API
                                   for the controllers; registers itself in etcd
"""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass

from control.agent_tls import DEFAULT_SERVER_NAME, TlsFiles

ALL_IN_ONE, CONTROLLER, NODE = "all-in-one", "controller", "node"
MODES = (ALL_IN_ONE, CONTROLLER, NODE)


@dataclass(frozen=True)
class ClusterConfig:
    agent_tls: TlsFiles | None = None  # both modes: the agent API's mutual TLS
    agent_server_name: str = DEFAULT_SERVER_NAME  # the name the agents' certificate holds
    # node mode
    agent_listen: str = ""  # HOST:PORT the agent API listens on
    agent_address: str = ""  # HOST:PORT the controllers dial (default: agent_listen)
    registration_ttl_s: int = 10  # a node silent this long is gone for the controllers
    registration_refresh_s: float = 10.0  # how stale its published figures may get
    kube_node_name: str = ""  # the Kubernetes node whose zone label is read
    # node mode, mirrored volumes (docs/mirror.md)
    replica_listen: str = ""  # HOST:PORT of this node's replica service ("": none)
    mirror_key: str = ""  # the cluster's shared key file of the mirror's wire protocol
    frontend_lease_ttl_s: int = 10  # a frontend's etcd lease (failover keys on it)
    fence_margin_s: float = 3.0  # a frontend stops serving this long before its lease ends
    supervise_interval_s: float = 2.0  # how often dead data-path processes are restarted
    # controller mode
    controller_id: str = ""  # what the leader election shows for this controller
    leader_ttl_s: int = 10  # a leader silent this long is replaced


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster modes")
    g.add_argument("--mode", choices=MODES, default=ALL_IN_ONE,
                   help="all-in-one (default): everything in one process; controller or "
                        "node: one part of a cluster sharing an etcd (--store etcds://...)")
    g.add_argument("--agent-listen", default="",
                   help="node: HOST:PORT of the node agent API (mutual TLS)")
    g.add_argument("--agent-address", default="",
                   help="node: HOST:PORT the controllers dial (default: --agent-listen)")
    g.add_argument("--agent-ca", default="", help="the CA of the agent API's certificates")
    g.add_argument("--agent-cert", default="", help="this process's agent API certificate")
    g.add_argument("--agent-key", default="", help="its key")
    g.add_argument("--agent-server-name", default=DEFAULT_SERVER_NAME,
                   help="controller: the name the agents' certificate is issued for")
    g.add_argument("--registration-ttl", type=int, default=10,
                   help="node: seconds without renewal before the controllers drop the node")
    g.add_argument("--registration-refresh", type=float, default=10.0,
                   help="node: seconds between refreshes of its published pool figures")
    g.add_argument("--kube-node-name", default="",
                   help="node: the Kubernetes node whose zone label is read (default: "
                        "--node-id)")
    g.add_argument("--replica-listen", default="",
                   help="node: HOST:PORT of its replica service for mirrored volumes (the "
                        "other zones' frontends reach it there); none without it")
    g.add_argument("--mirror-key", default="",
                   help="node: the file with the cluster's shared key of the mirror protocol")
    g.add_argument("--frontend-lease-ttl", type=int, default=10,
                   help="node: seconds of a mirror frontend's etcd lease (failover waits for "
                        "it to expire)")
    g.add_argument("--fence-margin", type=float, default=3.0,
                   help="node: seconds before its lease ends that a frontend stops serving, "
                        "unless its replicas vouch for it (etcd unreachable: see "
                        "docs/cluster-internals.md, Self-fencing)")
    g.add_argument("--controller-id", default="",
                   help="controller: its name in the leader election (default: host:pid)")
    g.add_argument("--leader-ttl", type=int, default=10,
                   help="controller: seconds a silent leader keeps the leadership")


def from_arguments(p: argparse.ArgumentParser, a: argparse.Namespace) -> ClusterConfig:
    if a.mode == ALL_IN_ONE:
        return ClusterConfig()
    files = (a.agent_ca, a.agent_cert, a.agent_key)
    if not all(files):
        p.error(f"--mode {a.mode} needs --agent-ca, --agent-cert and --agent-key (the agent "
                "API is mutual TLS)")
    if not a.store.startswith(("etcd://", "etcds://")):
        p.error(f"--mode {a.mode} needs the cluster's etcd: --store etcds://HOST:PORT,...")
    if a.registration_ttl < 2 or a.leader_ttl < 2 or a.registration_refresh <= 0:
        p.error("--registration-ttl and --leader-ttl are at least 2 seconds, "
                "--registration-refresh positive")
    if a.mode == NODE:
        if not _host_port(a.agent_listen):
            p.error("--mode node needs --agent-listen HOST:PORT")
        if a.agent_address and not _host_port(a.agent_address):
            p.error("--agent-address is HOST:PORT")
        if a.replica_listen and (not _host_port(a.replica_listen) or not a.mirror_key):
            p.error("--replica-listen is HOST:PORT and needs --mirror-key")
        if not 0 < a.fence_margin < a.frontend_lease_ttl:
            p.error("--fence-margin must be positive and below --frontend-lease-ttl")
        address = a.agent_address or a.agent_listen
        if address.rpartition(":")[0] in ("0.0.0.0", "[::]", ""):
            p.error("--agent-listen is a wildcard: give --agent-address, the address the "
                    "controllers reach this node at")
    return ClusterConfig(
        agent_tls=TlsFiles(*(os.path.abspath(f) for f in files)),
        agent_server_name=a.agent_server_name, agent_listen=a.agent_listen,
        agent_address=a.agent_address or a.agent_listen,
        registration_ttl_s=a.registration_ttl, registration_refresh_s=a.registration_refresh,
        kube_node_name=a.kube_node_name or a.node_id,
        controller_id=a.controller_id or f"{socket.gethostname()}:{os.getpid()}",
        leader_ttl_s=a.leader_ttl, replica_listen=a.replica_listen,
        mirror_key=os.path.abspath(a.mirror_key) if a.mirror_key else "",
        frontend_lease_ttl_s=a.frontend_lease_ttl, fence_margin_s=a.fence_margin)


def _host_port(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536
