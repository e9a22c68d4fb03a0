"""`tandem-csi --mode controller`: one of the cluster's controllers (a Deployment of two).

Serves Identity, Controller, GroupController and SnapshotMetadata on its unix socket to
the sidecars beside it. Records live in etcd; nodes are reached only through their agents
(control/agent_client.py), found through their registrations (control/node_watch.py).

Every controller serves calls: the upstream sidecars elect their own leaders, so a
sidecar may talk to a controller that is not Tandem's leader, and every write is
compare-and-set on the records (two controllers racing on a name make one volume). Only
the background work (reconciler: intent expiry, tombstones, orphan reports) is the
elected leader's, fenced by its lease (control/leader.py). A controller keeps no state of
its own: kill it at any point and the other one, or its restart, carries on.
"""

from __future__ import annotations

import logging

from control.agent_client import AgentClient
from control.agent_tls import ReloadingTls
from control.etcd_store import EtcdStore
from control.leader import LeaderDuties
from control.node_watch import NodeWatch
from control.plane import ControlPlane
from control.registration import Registration
from control.registry import NodeRegistry
from control.stores import StoreSpec, open_store
from csi.config import Config
from csi.server import Driver, clear_stale_socket, socket_path
from engine.backup.targets import Targets

log = logging.getLogger("tandem")


class ControllerDriver(Driver):
    def __init__(self, config: Config):
        super().__init__(config)
        self.node_watch: NodeWatch | None = None
        self.leader: LeaderDuties | None = None

    def start(self) -> None:
        cfg = self.config
        cluster = cfg.cluster
        assert cluster.agent_tls is not None  # checked with the arguments
        Targets.load(cfg.backup_targets_file)  # checked before anything starts
        path = socket_path(cfg.endpoint)
        clear_stale_socket(path)
        store = open_store(StoreSpec(cfg.store_url, cfg.store_ca_file, cfg.store_cert_file,
                                     cfg.store_key_file, cfg.store_timeout_s,
                                     cfg.store_namespace))
        assert isinstance(store, EtcdStore)  # the arguments allow etcd only
        self.cluster_store = store
        tls = ReloadingTls(cluster.agent_tls)

        def connect(reg: Registration) -> AgentClient:
            return AgentClient(reg.node_id, reg.agent_address, tls,
                               server_name=cluster.agent_server_name)

        nodes = NodeRegistry()
        self.node_watch = NodeWatch(store, nodes, connect)
        self.node_watch.start()
        targets = Targets.load(cfg.backup_targets_file)  # a bad file stops the start here
        plane = ControlPlane(store, nodes, self.volume_policy(), targets=targets,
                             backup_lock_stale_s=cfg.backup_lock_stale_s)
        plane.start(cfg.reconcile_interval_s, shared_store=True, reconcile=False)
        self.plane = plane
        self.leader = LeaderDuties(store, plane, cluster.controller_id,
                                   cfg.reconcile_interval_s, ttl_s=cluster.leader_ttl_s)
        self.leader.start()
        self.server = self.grpc_server()
        self.add_identity()
        self.add_controller(plane, nodes)
        self.serve(path)
        log.info("tandem-csi controller %s serving on %s (%d nodes registered)",
                 cluster.controller_id, path, len(nodes.ids()))

    def stop(self, grace_s: float = 5.0) -> None:
        if self.leader is not None:
            self.leader.stop()  # resign: the other controller takes over at once
        if self.node_watch is not None:
            self.node_watch.close()
        super().stop(grace_s)
