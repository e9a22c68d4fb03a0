"""`tandem-csi --mode node`: one node of a cluster.

Serves the kubelet (Identity + Node on the unix socket) and the controllers (the node
agent API over TCP with mutual TLS: control/agent_server.py), and registers itself in the
cluster's etcd with its zone, pool and IOPS capacity and agent address, under a lease it
keeps alive (control/registration.py).

Stage, publish and their records stay in the node's embedded SQLite (engine/state.py):
a node cut off from etcd (or from every controller) still unpublishes and unstages.
Its zone is the Kubernetes node's topology.kubernetes.io/zone label unless --zone says
otherwise (csi/zone.py); without either it does not start.

Backups: the controllers start uploads and restores on the node that holds the data
(node API start_backup / start_restore), sending each job's target and credentials over
the agent API. The node runs them only to a target its own --backup-targets file defines
the same way (endpoint, bucket, prefix), opening that file's caBundle; the credentials
stay in memory (docs/backup.md, "In a cluster").
"""

from __future__ import annotations

import dataclasses
import logging
import os

from control.agent_server import AgentServer
from control.agent_tls import ReloadingTls
from control.etcd_store import EtcdStore
from control.frontend_backend import FrontendBackend
from control.local_node import LocalNode
from control.node_mirror import ClusterAccess, FrontendHost, ReplicaHost
from control.registration import Registrar
from control.stores import StoreSpec, open_store
from control.supervisor import Supervisor
from csi.config import Config
from csi.identity import driver_version
from csi.node import NodeService
from csi.server import Driver, StartupError, clear_stale_socket, socket_path, take_state_lock
from csi.zone import ZoneUnknown, resolve_zone
from engine.backup.targets import Targets
from engine.errors import Precondition
from proto import csi_pb2_grpc

log = logging.getLogger("tandem")


class NodeDriver(Driver):
    def __init__(self, config: Config):
        super().__init__(config)
        self.agent: AgentServer | None = None
        self.registrar: Registrar | None = None
        self.replicas: ReplicaHost | None = None
        self.supervisor: Supervisor | None = None

    def start(self) -> None:
        cluster = self.config.cluster
        assert cluster.agent_tls is not None  # checked with the arguments
        try:
            zone = resolve_zone(self.config.zone, cluster.kube_node_name)
        except ZoneUnknown as e:
            raise StartupError(f"this node's zone is unknown: {e}") from None
        self.config = cfg = dataclasses.replace(self.config, zone=zone)
        # where this node may send volumes' data: a bad file stops the start here
        targets = Targets.load(cfg.backup_targets_file)
        self._lock_fd = take_state_lock(cfg)
        path = socket_path(cfg.endpoint)
        clear_stale_socket(path)
        engine = self.open_engine()
        self.replicas = self._replica_host(engine)
        host = self._frontends()
        assert self.store is not None  # open_engine opened it
        frontends = FrontendBackend(self.store, host, cfg.node_id) if host else None
        node = LocalNode(engine, cfg.max_volumes_per_node, self.replicas, frontends,
                         targets=targets, backup_lock_stale_s=cfg.backup_lock_stale_s)
        self.local_node = node
        self.agent = AgentServer(node, cluster.agent_listen, ReloadingTls(cluster.agent_tls))
        self.agent.start()
        store = open_store(StoreSpec(cfg.store_url, cfg.store_ca_file, cfg.store_cert_file,
                                     cfg.store_key_file, cfg.store_timeout_s,
                                     cfg.store_namespace))
        assert isinstance(store, EtcdStore)  # the arguments allow etcd only
        self.cluster_store = store
        self.registrar = Registrar(store, node, cluster.agent_address, driver_version(),
                                   ttl_s=cluster.registration_ttl_s,
                                   refresh_s=cluster.registration_refresh_s)
        self.registrar.start()
        checks = [c.revive for c in (self.replicas, host) if c is not None]
        if checks:
            self.supervisor = Supervisor(checks, cluster.supervise_interval_s).start()
        self.server = self.grpc_server()
        self.add_identity()
        csi_pb2_grpc.add_NodeServicer_to_server(
            NodeService(cfg, engine, frontends), self.server)
        self.serve(path)
        log.info("tandem-csi node %s (zone %s) serving the kubelet on %s and the agent API "
                 "on %s", cfg.node_id, zone, path, self.agent.address)

    def _replica_host(self, engine) -> ReplicaHost | None:
        """This node's replica service (adopted if it outlived an earlier agent); none
        without --replica-listen, or on a backend that cannot hold replicas."""
        cluster = self.config.cluster
        if not cluster.replica_listen:
            return None
        try:
            directory = engine.replica_directory()
        except Precondition as e:
            log.warning("no replicas on this node: %s", e)
            return None
        host = ReplicaHost(directory, cluster.replica_listen, cluster.mirror_key)
        host.start()
        return host

    def _frontends(self) -> FrontendHost | None:
        """Frontends of the mirrored volumes staged here, adopted from an earlier agent."""
        cfg, cluster = self.config, self.config.cluster
        if not cluster.mirror_key:
            return None
        host = FrontendHost(os.path.join(cfg.state_dir, "frontends"), cluster.mirror_key,
                            cfg.node_id, ClusterAccess(
                                cfg.store_url, cfg.store_ca_file, cfg.store_cert_file,
                                cfg.store_key_file, cfg.store_namespace, cfg.store_timeout_s,
                                cluster.frontend_lease_ttl_s, cluster.fence_margin_s))
        adopted = host.adopt_all()
        if adopted:
            log.info("adopted the running frontends of %s", ", ".join(adopted))
        return host

    def stop(self, grace_s: float = 5.0) -> None:
        if self.supervisor is not None:  # the data path outlives the agent on purpose
            self.supervisor.stop()
        if self.registrar is not None:
            self.registrar.stop()  # the controllers stop sending work first
        if self.agent is not None:
            self.agent.stop(grace_s)
        super().stop(grace_s)
