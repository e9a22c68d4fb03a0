"""The driver's configuration: one object, built once at start-up and passed in."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from control.topology import DEFAULT_ZONE, TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY
from csi.cluster_config import ALL_IN_ONE, ClusterConfig
from engine.nvme.backend import NvmeConfig
from engine.qos.capacity import RUN_S
from engine.qos.tiers import DEFAULT_TIERS, QosSpec

DRIVER_NAME = "tandem.csi.dev"
GIB = 1024**3
__all__ = ["DEFAULT_ZONE", "DRIVER_NAME", "GIB", "TOPOLOGY_NODE_KEY", "TOPOLOGY_ZONE_KEY",
           "Config"]


@dataclass(frozen=True)
class Config:
    endpoint: str
    node_id: str
    state_dir: str
    zone: str = DEFAULT_ZONE
    pool_dir: str = ""  # default: <state_dir>/pool
    pool_image_bytes: int = 100 * GIB
    pool_image_fs: str = "xfs"  # the image made when the pool dir is not copy-on-write
    overcommit_ratio: float = 20.0
    max_volumes_per_node: int = 128
    default_volume_bytes: int = 1 * GIB
    allowed_path_roots: tuple[str, ...] = ()  # opt-in restriction of target paths
    tiers: dict[str, QosSpec] = field(default_factory=lambda: dict(DEFAULT_TIERS))
    cgroup_root: str = "/sys/fs/cgroup"  # the host's cgroup tree, where the pods' live
    cgroup_parent: str = ""  # where the kubelet's "kubepods" sits under each hierarchy
    node_iops_capacity: int = 0  # for guaranteed minima; 0: measure the pool once
    capacity_measure_s: int = RUN_S  # how long that one-off measurement runs
    workers: int = 16
    store_url: str = ""  # cluster records; "" = sqlite:<state_dir>/cluster.sqlite
    store_ca_file: str = ""
    store_cert_file: str = ""
    store_key_file: str = ""
    store_timeout_s: float = 5.0
    store_namespace: str = "/tandem/"
    intent_timeout_s: float = 600.0  # a create not confirmed by then is abandoned
    reconcile_interval_s: float = 30.0
    replica_replace_after_s: float = 300.0  # a lost replica of a mirrored volume is replaced
    # where volumes' blocks live: "loop" (files in the pool) or "nvme" (a namespace each)
    backend: str = "loop"
    nvme: NvmeConfig | None = None  # the NVMe backend's settings (backend "nvme")
    mode: str = ALL_IN_ONE  # or controller, node (csi/cluster_config.py)
    cluster: ClusterConfig = ClusterConfig()
    backup_targets_file: str = ""  # backup targets (engine/backup/targets.py); "" = no backups
    backup_lock_stale_s: float = 600.0  # a bucket lock older than this was left by the dead

    @property
    def pool_directory(self) -> str:
        return self.pool_dir or os.path.join(self.state_dir, "pool")

    @property
    def pool_image_path(self) -> str:
        return os.path.join(self.state_dir, "pool.img")

    @property
    def store_path(self) -> str:
        return os.path.join(self.state_dir, "state.sqlite")

    @property
    def cluster_store_url(self) -> str:
        return self.store_url or "sqlite:" + os.path.join(self.state_dir, "cluster.sqlite")

    @property
    def socket_path(self) -> str:
        path = self.endpoint[len("unix://"):]
        return path if path.startswith("/") else "/" + path

    @property
    def orphans_path(self) -> str:
        return os.path.join(self.state_dir, "orphans.json")

    @property
    def lock_path(self) -> str:
        return os.path.join(self.state_dir, "tandem.lock")
