"""`tandem-csi`: the all-in-one driver (Identity + Controller + Node on one socket), and
the entry point of the cluster modes (--mode controller: csi/controller_mode.py; --mode
node: csi/node_mode.py), which reuse this driver's pieces."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time

import grpc

from control.local_node import LocalNode
from control.plane import ControlPlane
from control.reconcile import Orphans
from control.registry import NodeRegistry
from control.store import Store
from control.stores import StoreSpec, open_store
from control.volumes import VolumePolicy
from control.warm_pool import WarmPool, fast_lane
from csi import cluster_config
from csi.config import DEFAULT_ZONE, GIB, Config
from csi.controller import ControllerService
from csi.group_controller import GroupControllerService
from csi.identity import IdentityService
from csi.node import NodeService
from csi.snapshot_metadata import SnapshotMetadataService
from csi.snapshotter import Snapshotter
from engine import fileops, permissions
from engine.backend import BACKENDS, LOOP, NVME, Backend
from engine.backup.targets import Targets
from engine.errors import EngineError, InvalidSpec
from engine.loop_backend import LoopBackend
from engine.loopdev import LoopDevices
from engine.mounts import Mounts
from engine.node_engine import NodeEngine, NodeIdentity
from engine.node_qos import NodeQos
from engine.nvme import backend as nvme
from engine.pool import Pool
from engine.qos import capacity
from engine.qos.tiers import DEFAULT_TIERS, load_tiers
from engine.state import SqliteStore
from proto import csi_pb2_grpc

log = logging.getLogger("tandem")


class StartupError(Exception):
    """Something a person must fix before the driver can start; printed, no traceback."""


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="tandem-csi", description=__doc__)
    p.add_argument("--endpoint", default="unix:///run/tandem/csi.sock",
                   help="unix:///path/to/csi.sock")
    p.add_argument("--node-id", default=socket.gethostname())
    p.add_argument("--state-dir", default="/var/lib/tandem")
    p.add_argument("--zone", default="",
                   help=f"all-in-one: default {DEFAULT_ZONE!r}; node: default the Kubernetes "
                        "node's topology.kubernetes.io/zone label")
    p.add_argument("--pool", default="", help="pool directory (default: STATE_DIR/pool)")
    p.add_argument("--pool-size-gib", type=int, default=100,
                   help="size of the sparse pool image made when --pool is not copy-on-write")
    p.add_argument("--pool-fs", choices=["btrfs", "xfs"], default="xfs",
                   help="filesystem of that image: xfs (reflinked files, 16 MiB extent "
                        "hints) or btrfs (subvolume snapshots); docs/snapshots.md")
    p.add_argument("--overcommit-ratio", type=float, default=None,
                   help="thin provisioning of the loop pool (default 20); 1 for nvme")
    p.add_argument("--max-volumes-per-node", type=int, default=128)
    p.add_argument("--allowed-path-root", action="append", default=[],
                   help="opt-in: refuse staging/target paths outside these roots (repeatable)")
    p.add_argument("--tiers-file", default="", help="JSON file of QoS tiers")
    p.add_argument("--cgroup-root", default="/sys/fs/cgroup",
                   help="the host's cgroup tree (QoS rules go on the pods' cgroups)")
    p.add_argument("--cgroup-parent", default="",
                   help="cgroup under which the kubelet's kubepods sits (default: the root)")
    p.add_argument("--node-iops-capacity", type=int, default=0,
                   help="IOPS the pool guarantees minima from, set at every start; 0: the "
                   "figure kept in the state (measured with fio at the first start, or "
                   "set with tandem-admin capacity)")
    p.add_argument("--capacity-measure-seconds", type=int, default=capacity.RUN_S,
                   help="length of that one-off measurement (after a warm-up of a third of it, "
                   "10 s at most)")
    p.add_argument("--store", default="",
                   help="cluster records: sqlite:PATH (default STATE_DIR/cluster.sqlite), "
                        "etcd://HOST:PORT,... or etcds://HOST:PORT,...")
    p.add_argument("--store-ca", default="", help="etcds: CA bundle of the etcd members")
    p.add_argument("--store-cert", default="", help="etcds: client certificate")
    p.add_argument("--store-key", default="", help="etcds: client key")
    p.add_argument("--store-namespace", default="/tandem/",
                   help="etcd: the key prefix of this cluster's records")
    p.add_argument("--store-timeout", type=float, default=5.0,
                   help="seconds before a store call's outcome counts as unknown")
    p.add_argument("--replica-replace-after", type=float, default=300.0,
                   help="controller: seconds a mirrored volume's replica may be away (its "
                        "node unregistered) before a new one replaces it")
    p.add_argument("--intent-timeout", type=float, default=600.0,
                   help="seconds before an unconfirmed create is abandoned (its storage removed)")
    p.add_argument("--reconcile-interval", type=float, default=30.0,
                   help="seconds between reconcile rounds (0: only at start-up)")
    p.add_argument("--backend", choices=BACKENDS, default=LOOP,
                   help="where volumes' blocks live: loop (a file each in the pool) or nvme "
                        "(a namespace each; docs/nvme.md)")
    p.add_argument("--nvme-subsystem", default="",
                   help="nvme: the subsystem NQN whose namespaces hold the volumes")
    p.add_argument("--nvme-controller", default="",
                   help="nvme: the controller of that subsystem to use (default: the live one)")
    p.add_argument("--nvme-namespaces", choices=[nvme.MANAGE, nvme.POOL], default=nvme.MANAGE,
                   help="nvme: manage (create-ns/delete-ns per volume; needs Namespace "
                        "Management) or pool (pre-created namespaces, attached on create)")
    p.add_argument("--nvme-pool-nsids", default="",
                   help="nvme pool: the pre-created namespaces' IDs, e.g. 1-8,12")
    p.add_argument("--nvme-measure-nsid", type=int, default=0,
                   help="nvme: a namespace reserved for measuring the IOPS capacity")
    p.add_argument("--nvme-sector-size", type=int, choices=[512, 4096], default=4096,
                   help="nvme manage: LBA data size of the namespaces made")
    p.add_argument("--nvme-lba-format", type=int, default=-1,
                   help="nvme manage: FLBAS index to create namespaces with (default: the "
                        "one of --nvme-sector-size)")
    p.add_argument("--nvme-wipe", choices=[nvme.WRITE_ZEROES, nvme.FORMAT],
                   default=nvme.WRITE_ZEROES,
                   help="nvme pool: how a namespace is wiped before reuse")
    p.add_argument("--backup-targets", default="",
                   help="JSON file naming backup targets (endpoint, bucket, prefix); "
                        "controllers and nodes of a cluster need the same one (a node "
                        "sends data only to the targets it names); see docs/backup.md")
    p.add_argument("--backup-lock-stale-s", type=float, default=600.0,
                   help="seconds after which a bucket lock no process refreshed is ignored")
    p.add_argument("--log-level", default="INFO")
    cluster_config.add_arguments(p)
    a = p.parse_args(argv)
    if a.overcommit_ratio is None:
        a.overcommit_ratio = 1.0 if a.backend == NVME else 20.0
    if a.backend == NVME and a.overcommit_ratio != 1.0:
        p.error("--backend nvme: namespaces are fully provisioned; --overcommit-ratio must be 1")
    nvme_config = None
    if a.backend == NVME:
        try:
            nvme_config = nvme.NvmeConfig(
                subsysnqn=a.nvme_subsystem, namespaces=a.nvme_namespaces,
                pool_nsids=parse_nsids(a.nvme_pool_nsids), measure_nsid=a.nvme_measure_nsid,
                controller=a.nvme_controller, sector_size_bytes=a.nvme_sector_size,
                lba_format=a.nvme_lba_format, wipe=a.nvme_wipe, node_id=a.node_id)
            nvme_config.check()
        except InvalidSpec as e:
            p.error(str(e))
    if not a.endpoint.startswith("unix://"):
        p.error("--endpoint must be unix:///path")
    if a.overcommit_ratio <= 0 or a.max_volumes_per_node < 0 or a.pool_size_gib <= 0 \
            or a.node_iops_capacity < 0:
        p.error("--overcommit-ratio, --pool-size-gib must be positive, "
                "--max-volumes-per-node and --node-iops-capacity not negative")
    if a.capacity_measure_seconds < capacity.MIN_SAMPLES + 1:
        p.error(f"--capacity-measure-seconds must be at least {capacity.MIN_SAMPLES + 1}")
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cluster = cluster_config.from_arguments(p, a)
    tiers = load_tiers(a.tiers_file) if a.tiers_file else dict(DEFAULT_TIERS)
    return Config(
        endpoint=a.endpoint, node_id=a.node_id, state_dir=os.path.abspath(a.state_dir),
        # a node's zone is looked up at start (csi/zone.py); never a default in a cluster
        zone=a.zone or (DEFAULT_ZONE if a.mode == cluster_config.ALL_IN_ONE else ""),
        pool_dir=os.path.abspath(a.pool) if a.pool else "",
        pool_image_bytes=a.pool_size_gib * GIB, pool_image_fs=a.pool_fs,
        overcommit_ratio=a.overcommit_ratio,
        max_volumes_per_node=a.max_volumes_per_node,
        allowed_path_roots=tuple(os.path.realpath(r) for r in a.allowed_path_root),
        tiers=tiers, cgroup_root=a.cgroup_root, cgroup_parent=a.cgroup_parent,
        node_iops_capacity=a.node_iops_capacity, capacity_measure_s=a.capacity_measure_seconds,
        store_url=a.store, store_ca_file=a.store_ca, store_cert_file=a.store_cert,
        store_key_file=a.store_key, store_timeout_s=a.store_timeout,
        store_namespace=a.store_namespace,
        intent_timeout_s=a.intent_timeout, reconcile_interval_s=a.reconcile_interval,
        replica_replace_after_s=a.replica_replace_after,
        backend=a.backend, nvme=nvme_config, mode=a.mode, cluster=cluster,
        backup_targets_file=os.path.abspath(a.backup_targets) if a.backup_targets else "",
        backup_lock_stale_s=a.backup_lock_stale_s,
    )


def parse_nsids(text: str) -> tuple[int, ...]:
    """'1-4,7' -> (1, 2, 3, 4, 7)"""
    found: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise InvalidSpec(f"bad namespace ID range {part!r} in {text!r}") from None
        if not 0 < lo <= hi:
            raise InvalidSpec(f"bad namespace ID range {part!r} in {text!r}")
        found += range(lo, hi + 1)
    return tuple(dict.fromkeys(found))


def socket_path(endpoint: str) -> str:
    path = endpoint[len("unix://"):]
    return path if path.startswith("/") else "/" + path


def take_state_lock(config: Config) -> int:
    """One driver per state dir: a second one would corrupt the other's work."""
    permissions.private_dir(config.state_dir)  # records and pool image: tenants' data
    fd = os.open(config.lock_path, os.O_RDWR | os.O_CREAT, permissions.PRIVATE_FILE)
    permissions.tighten(config.lock_path, permissions.PRIVATE_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StartupError(
            f"another tandem-csi (pid {holder}) is already using state dir {config.state_dir}"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def clear_stale_socket(path: str) -> None:
    """Remove a socket left by a dead driver; refuse one a live server still answers on."""
    if not os.path.exists(path):
        # only root's sidecars talk to the socket (0600): a directory made for it is 0700;
        # one that exists (the kubelet's plugin dir) is left as it is
        os.makedirs(os.path.dirname(path), mode=permissions.PRIVATE_DIR, exist_ok=True)
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            raise
        os.unlink(path)
        return
    finally:
        probe.close()
    raise StartupError(f"{path} is in use by another running server")


class Driver:
    """Wires store, engine and services; start() serves, stop() shuts down cleanly."""

    def __init__(self, config: Config):
        self.config = config
        self.ready = threading.Event()
        self.server: grpc.Server | None = None
        self.store: SqliteStore | None = None  # node-local records
        self.cluster_store: Store | None = None  # cluster records
        self.plane: ControlPlane | None = None
        self.engine: NodeEngine | None = None
        self.local_node: LocalNode | None = None
        self._lock_fd = -1

    def start(self) -> None:
        cfg = self.config
        self._lock_fd = take_state_lock(cfg)
        targets = Targets.load(cfg.backup_targets_file)  # a bad file stops the start here
        path = socket_path(cfg.endpoint)
        clear_stale_socket(path)
        engine = self.open_engine()
        cfg = self.config  # the engine may lower max volumes (open_engine)
        self.cluster_store = open_store(StoreSpec(
            cfg.cluster_store_url, cfg.store_ca_file, cfg.store_cert_file, cfg.store_key_file,
            cfg.store_timeout_s, cfg.store_namespace))
        nodes = NodeRegistry(info_ttl_s=0)  # in-process: a statvfs, no need to cache
        self.local_node = LocalNode(engine, cfg.max_volumes_per_node, targets=targets,
                                    backup_lock_stale_s=cfg.backup_lock_stale_s)
        nodes.add(self.local_node)
        plane = ControlPlane(self.cluster_store, nodes, self.volume_policy(),
                             report=self._report_orphans, targets=targets,
                             backup_lock_stale_s=cfg.backup_lock_stale_s)
        plane.start(cfg.reconcile_interval_s,
                    shared_store=not cfg.cluster_store_url.startswith("sqlite:"))
        self.plane = plane
        self.server = self.grpc_server()
        self.add_identity()
        self.add_controller(plane, nodes)
        csi_pb2_grpc.add_NodeServicer_to_server(NodeService(cfg, engine), self.server)
        self.serve(path)
        log.info("tandem-csi serving on %s (node %s, zone %s, pool %s)", path, cfg.node_id,
                 cfg.zone, cfg.pool_directory)

    # --- the pieces, shared with the cluster modes (csi/node_mode.py, controller_mode.py) --
    def open_engine(self) -> NodeEngine:
        """The node's storage: its local records, pool, loop devices and QoS, settled."""
        cfg = self.config
        self.store = SqliteStore(cfg.store_path)
        loops, mounts = LoopDevices(), Mounts()
        qos = NodeQos(self.store, cfg.cgroup_root, cgroup_parent=cfg.cgroup_parent)
        engine = NodeEngine(NodeIdentity(cfg.node_id, cfg.zone), self.store,
                            self._backend(loops, mounts), mounts,
                            qos=qos, iops_capacity=cfg.node_iops_capacity,
                            measure_s=cfg.capacity_measure_s)
        engine.open()
        self.engine = engine
        # the backend may hold fewer volumes than configured (an NVMe controller's limit)
        self.config = dataclasses.replace(
            cfg, max_volumes_per_node=engine.max_volumes(cfg.max_volumes_per_node))
        return engine

    def volume_policy(self) -> VolumePolicy:
        cfg = self.config
        return VolumePolicy(overcommit_ratio=cfg.overcommit_ratio,
                            max_volumes_per_node=cfg.max_volumes_per_node,
                            intent_timeout_s=cfg.intent_timeout_s,
                            replica_replace_after_s=cfg.replica_replace_after_s)

    def grpc_server(self) -> grpc.Server:
        return grpc.server(
            WarmPool(max_workers=self.config.workers, name="csi"),
            options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)],
        )

    def add_identity(self) -> None:
        assert self.server is not None
        identity = fast_lane(IdentityService(self.ready),
                             ("Probe", "GetPluginInfo", "GetPluginCapabilities"))
        csi_pb2_grpc.add_IdentityServicer_to_server(identity, self.server)

    def add_controller(self, plane: ControlPlane, nodes: NodeRegistry) -> None:
        """Controller, GroupController and SnapshotMetadata over the control plane."""
        assert self.server is not None
        snapshotter = Snapshotter(plane.snapshots, plane.backups)
        csi_pb2_grpc.add_ControllerServicer_to_server(
            ControllerService(self.config, plane.volumes, plane.snapshots, snapshotter, nodes,
                              plane.index), self.server)
        csi_pb2_grpc.add_GroupControllerServicer_to_server(
            GroupControllerService(snapshotter), self.server)
        csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(
            SnapshotMetadataService(plane.snapshots, nodes), self.server)

    def serve(self, path: str) -> None:
        """Serve on the unix socket at `path` (the CO's and the sidecars' only door)."""
        assert self.server is not None
        # The socket is bound here with the process umask: make it owner-only from the start
        # rather than chmod it after a window in which others could connect.
        umask = os.umask(0o077)
        try:
            self.server.add_insecure_port(f"unix://{path}")
        finally:
            os.umask(umask)
        os.chmod(path, permissions.PRIVATE_FILE)
        self.server.start()
        self.ready.set()

    def _backend(self, loops: LoopDevices, mounts: Mounts) -> Backend:
        """The pool's backend, as configured (engine/backend.py)."""
        cfg = self.config
        assert self.store is not None
        if cfg.backend == NVME:
            assert cfg.nvme is not None
            return nvme.NvmeBackend(self.store, cfg.nvme, loops=loops)
        pool = Pool(cfg.pool_directory, cfg.pool_image_path, cfg.pool_image_bytes,
                    image_fs=cfg.pool_image_fs, loops=loops, mounts=mounts)
        return LoopBackend(self.store, pool, loops)

    def _report_orphans(self, orphans: Orphans) -> None:
        """What no record owns, for `tandem-admin orphans` (kept, never deleted)."""
        engine = self.engine
        report = {
            "at": time.time(),
            # this node's volumes and snapshots that no cluster record names
            "volumes": orphans.volumes.get(self.config.node_id, []),
            "snapshots": orphans.snapshots.get(self.config.node_id, []),
            # pool objects that not even this node's own records name
            "pool_volumes": list(engine.files.orphans) if engine else [],
            "pool_snapshots": list(engine.snapshots.orphans) if engine else [],
        }
        fileops.write_file_atomic(self.config.orphans_path, json.dumps(report, indent=2))

    def stop(self, grace_s: float = 5.0) -> None:
        self.ready.clear()
        if self.server is not None:
            self.server.stop(grace_s).wait()
        if self.plane is not None:
            self.plane.close()
        if self.local_node is not None:
            self.local_node.close()  # background uploads and restores stop (resumable)
        if self.cluster_store is not None:
            self.cluster_store.close()
        if self.engine is not None:
            self.engine.close()
        if self.store is not None:
            self.store.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def make_driver(config: Config) -> Driver:
    """The driver of the configured mode (cluster modes in modules of their own)."""
    if config.mode == cluster_config.CONTROLLER:
        from csi.controller_mode import ControllerDriver
        return ControllerDriver(config)
    if config.mode == cluster_config.NODE:
        from csi.node_mode import NodeDriver
        return NodeDriver(config)
    return Driver(config)


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    # Block the stop signals before any thread starts (threads inherit the mask) and take
    # them with sigwait: a Python handler that sets an Event can deadlock if the signal
    # lands while the main thread holds that Event's lock inside wait().
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    driver = make_driver(config)
    try:
        driver.start()
    except (StartupError, EngineError) as e:
        log.error("cannot start: %s", e)
        driver.stop(0)
        return 2
    sig = signal.sigwait(STOP_SIGNALS)
    log.info("stopping on %s", signal.Signals(sig).name)
    driver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
